"""Token-sharded pruning over torch.distributed (gloo, CPU): two ranks give what one process gives,
and a run killed under torchrun resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gloo import gloo_rank, spawn
from safetensors.torch import load_file
from tiny_lm import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from benchmarks.architecture_census import tiny_config
from sparsesolve import prune
from sparsesolve.core import distributed
from sparsesolve.core.config import PruneConfig, SparseLLMConfig
from sparsesolve.core.patterns import NM
from sparsesolve.core.quantize import GroupQuantizer
from sparsesolve.core.solvers import cg_refit, sparsegpt
from sparsesolve.core.solvers.row_share import solve_rows
from sparsesolve.lm.adapters import get_adapter
from sparsesolve.lm.decoder import prune_decoder
from sparsesolve.lm.fisher import output_fisher
from sparsesolve.lm.memory import pruning_memory_of

ROOT = Path(__file__).resolve().parents[1]
#: 5 windows: shares of 3 and 2 (uneven)
WINDOWS = 5
CONFIGS = {"sparsegpt": PruneConfig("2:4", method="sparsegpt"),
           "sparsellm": PruneConfig("0.6", method="sparsellm", chunk_size=48),
           "mixtral": PruneConfig("2:4", method="sparsellm", chunk_size=48),
           # 2 of the 5 windows held out, chosen by their index over both ranks' shares
           "heldout": PruneConfig("0.6", method="sparsellm", chunk_size=48,
                                  sparsellm=SparseLLMConfig.for_language_models(heldout_fraction=0.4))}


def _windows(task: str) -> torch.Tensor:
    """The tiny Mixtral reads 600 tokens (about 300 per expert: most above the expert's width of 128);
    the census-size Phi-3 of the Fisher task has a vocabulary of 256."""
    vocab, length = (256, 120) if task == "mixtral" else (256, 40) if task == "fisher" else (VOCAB, 40)
    return torch.randint(3, vocab, (WINDOWS, length), generator=torch.Generator().manual_seed(3))


def _model(task: str) -> torch.nn.Module:
    # float64: the two runs differ only by the order of the token sums (1e-16 relative), so any token
    # counted twice or missed would show; in float32 roundoff alone reaches 1e-5 on o_proj, whose
    # input (4 heads sharing 2 value heads) has an ill-conditioned Gram
    if task == "mixtral":
        torch.manual_seed(0)
        config = tiny_config("mixtral")
        config._experts_implementation = "eager"     # the grouped matmul has no float64 kernel on the CPU
        return AutoModelForCausalLM.from_config(config).eval().double()
    return tiny_model("llama", layers=2).double()


def _prune(task: str, windows: torch.Tensor, config: PruneConfig | None = None) -> dict[str, torch.Tensor]:
    model = _model(task)
    result = prune_decoder(model, windows, config or CONFIGS[task], progress=False)
    parts = [part for record in result.layers for part in (record.experts or [record.ffn])]
    routed = [float(getattr(part, "tokens", -1)) for part in parts]  # an expert's tokens over all ranks
    return {name: p.detach().clone() for name, p in model.named_parameters()} | {
        f"{name}.mask": m for name, m in result.masks.items()} | {
        "errors": torch.tensor([part.relative_error for part in parts], dtype=torch.float64),
        "heldout": torch.tensor([getattr(part, "heldout_relative_error", None) or 0.0 for part in parts],
                                dtype=torch.float64),
        "routed": torch.tensor(routed, dtype=torch.float64)}


def _worker(rank: int, port: int, out: Path) -> None:
    with gloo_rank(rank, port):              # one process group for every task: the start-up is paid once
        for task in (*CONFIGS, "chain", "rows", "disagree", "fisher"):
            _run_task(rank, out, task)


def _prune_chain(take: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ReLU MLP pruned by sparsellm on ``take`` of 101 inputs (this rank's share, or all of them)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).double()
    x = torch.randn(101, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prune(mlp, take(x), method="sparsellm", sparsity=0.5, iterations=3)
    return {k: v.detach().clone() for k, v in mlp.state_dict().items()}


def _row_solves() -> dict[str, torch.Tensor]:
    """Row-separable solves of a 7 x 24 float64 weight (shares of 4 and 3 rows): SparseGPT at 2:4 with
    4-bit joint quantisation, and conjugate gradients on its mask (stopping on all rows' residual)."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(7, 24, generator=generator, dtype=torch.float64)
    x = torch.randn(200, 24, generator=generator, dtype=torch.float64)
    h, rows = x.T @ x, weight.shape[0]
    with distributed.token_sharded():
        pruned = solve_rows(lambda r: sparsegpt(weight[r], h, NM(2, 4), quantizer=GroupQuantizer(4, 8)), rows, True)
        start = pruned.weight + 0.1
        refined = solve_rows(lambda r: cg_refit(weight[r], h, pruned.mask[r], start=start[r], tol=1e-6), rows, True)
    return {"weight": pruned.weight, "mask": pruned.mask, "scale": pruned.grid.scale, "zero": pruned.grid.zero,
            "error": torch.tensor([pruned.error, pruned.reference, refined.error]),
            "refined": refined.weight, "cg_iterations": torch.tensor(refined.info["cg_iterations"])}


def _fisher(windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Fisher row weights of a tiny float64 Phi-3 (gate and up share one fused module) on ``windows``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("phi3")).eval().double()
    with distributed.token_sharded():
        return output_fisher(model, get_adapter(model), [0, 1], windows, batch_size=2)


def _run_task(rank: int, out: Path, task: str) -> None:
    windows = _windows(task)[distributed.share(WINDOWS)]
    if task == "fisher":
        torch.save(_fisher(windows), out / f"{task}{rank}.pt")
        return
    if task == "rows":
        torch.save(_row_solves(), out / f"{task}{rank}.pt")
        return
    if task == "disagree":
        config = PruneConfig("2:4" if rank == 0 else "0.5", method="sparsegpt")
        try:
            _prune("sparsegpt", windows, config)
        except ValueError as error:
            torch.save(str(error), out / f"{task}{rank}.pt")
        return
    if task == "chain":
        torch.save(_prune_chain(lambda x: x[distributed.share(len(x))]), out / f"{task}{rank}.pt")
        return
    torch.save(_prune(task, windows), out / f"{task}{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where two gloo ranks saved every task's result (``TASKr.pt``)."""
    out = tmp_path_factory.mktemp("two_ranks")
    spawn(_worker, out)
    return out


def _results(folder: Path, task: str) -> tuple[object, object]:
    return torch.load(folder / f"{task}0.pt"), torch.load(folder / f"{task}1.pt")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_two_ranks_with_uneven_shares_match_one_process(task: str, two_ranks: Path) -> None:
    """sparsegpt and sparsellm on a tiny Llama; sparsellm on a tiny Mixtral (experts on their routed tokens,
    a different number on each rank, some with fewer than their width: the fallback decided on all ranks' counts)."""
    first, second = _results(two_ranks, task)
    single = _prune(task, _windows(task))
    assert first.keys() == single.keys()
    for name, value in single.items():
        assert torch.equal(first[name], second[name]), f"{name}: the ranks differ"
        if name.endswith(".mask"):
            assert torch.equal(first[name], value), f"{name}: mask differs from one process"
        else:
            assert _relative(first[name], value) <= 1e-10, (name, _relative(first[name], value))


def test_fisher_row_weights_of_two_ranks_match_one_process(two_ranks: Path) -> None:
    """Each module's squares are summed over the ranks once, also where gate and up share one."""
    first, second = _results(two_ranks, "fisher")
    single = _fisher(_windows("fisher"))
    assert first.keys() == single.keys() and any("gate_up_proj" in name for name in single)
    for name, value in single.items():
        assert torch.equal(first[name], second[name]), name
        assert _relative(first[name], value) <= 1e-10, (name, _relative(first[name], value))


def test_a_chain_pruned_by_two_ranks_matches_one_process(two_ranks: Path) -> None:
    first, second = _results(two_ranks, "chain")
    for name, value in _prune_chain(lambda x: x).items():
        assert torch.equal(first[name], second[name])
        assert torch.equal(first[name] == 0, value == 0) and _relative(first[name], value) <= 1e-10, name


def test_row_separable_solves_split_over_two_ranks_match_one_process(two_ranks: Path) -> None:
    """Each rank solves its share of the rows; the gathered weights, masks, grids, summed errors and
    the conjugate-gradient iterations (stopped on every row's residual) equal one process's, to the
    rounding of a matrix product over fewer rows (float64)."""
    first, second = _results(two_ranks, "rows")
    single = _row_solves()
    assert single["cg_iterations"] > 1
    for name, value in single.items():
        assert torch.equal(first[name], second[name]), name
        if value.is_floating_point():
            assert torch.allclose(first[name], value, rtol=1e-10, atol=1e-12), name
        else:
            assert torch.equal(first[name], value), name


def test_ranks_that_disagree_on_settings_each_get_one_clear_error(two_ranks: Path) -> None:
    errors = _results(two_ranks, "disagree")
    for error in errors:
        assert "ranks disagree on settings" in error and "pattern" in error and "'2:4'" in error, error
        assert "\n" not in error


def test_shares_are_contiguous_disjoint_and_cover_every_window() -> None:
    for count, ranks in [(5, 2), (64, 3), (7, 7), (3, 4)]:
        parts = [distributed.share(count, ranks, r) for r in range(ranks)]
        assert [i for p in parts for i in range(count)[p]] == list(range(count))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def _torchrun(*args: str) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m sparsesolve ARGS``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "sparsesolve", *args]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_run_killed_under_torchrun_resumes_to_the_same_weights(tiny_folder: Path, tmp_path: Path) -> None:
    common = ["prune", "--model", str(tiny_folder), "--nsamples", "8", "--seq-len", "64", "--calib", "ptb", "--quiet",
              "--method", "sparsellm", "--sparsity", "0.7", "--iterations", "3", "--data", "ptb", "--eval-windows", "2"]
    straight = _torchrun(*common, "--out", str(tmp_path / "straight"))
    victim = _torchrun(*common, "--out", str(tmp_path / "killed"))
    checkpoints = tmp_path / "killed.partial" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "layer_0001.pt").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in [victim.pid, *_descendants(victim.pid)]:  # the launcher and both ranks, as a job scheduler would
        os.kill(pid, signal.SIGKILL)
    victim.wait()
    done = sorted(p.name for p in checkpoints.glob("layer_*.pt"))
    assert 2 <= len(done) < 6, f"the kill should land part-way through the 6 layers, got {done}"
    assert straight.wait() == 0, straight.stderr.read().decode()[-3000:]
    resumed = _torchrun(*common, "--out", str(tmp_path / "killed"), "--resume")
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-3000:]
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert report["resumed_layers"] == list(range(len(done))) and report["ranks"] == 2
    assert len(report["peak_memory_mb_per_rank"]) == 2
    straight_report = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["perplexity"] == straight_report["perplexity"]
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_the_memory_model_divides_what_is_per_token_by_the_ranks(tiny_folder: Path) -> None:
    tokens = 65_536                      # more than two chunks of 8,192 on each of two ranks
    one = pruning_memory_of(tiny_folder, tokens=tokens, method="sparsellm")
    two = pruning_memory_of(tiny_folder, tokens=tokens, ranks=2, method="sparsellm")
    for term in ("hidden", "ffn_inputs", "workspace"):
        assert two[term] == one[term] / 2 > 0
    for term in ("chunks", "statistics", "layer", "model"):
        assert two[term] == one[term] > 0
    assert one["total"] == sum(v for k, v in one.items() if k not in ("total", "model"))
    # the tiny Llama: width 64, gated FFN of 256, float32
    # pre-activations of gate and up, the activation (whose storage the passes borrow), in bfloat16 (the
    # language-model default for a float32 model), and the dense target in float32
    assert one["workspace"] == 3 * tokens * 256 * 2 + tokens * 64 * 4
    float32 = pruning_memory_of(tiny_folder, tokens=tokens, method="sparsellm", aux_bytes=4)
    assert float32["workspace"] == 3 * tokens * 256 * 4 + tokens * 64 * 4
    assert one["chunks"] == 12 * 8192 * 256 * 4  # the update chunks (8,192 x 256 is below UPDATE_BLOCK values)
    # on the CPU the peak is the one-shot start: the kept pre-activations, the lent activation and the
    # output linear's statistics, before any candidate exists
    assert one["statistics"] == 3 * 256 * 256 * 4 + 3 * 64 * 256 * 4 and one["candidates"] == 0
    # off the CPU the pre-activations are computed after the start and the last iteration stores no
    # auxiliary: the peak is the output linear's solve, with the pass's activation, the start's three
    # weights and the refit's arrays, as for a layer-wise method plus those
    gpu = pruning_memory_of(tiny_folder, tokens=tokens, method="sparsellm", device="cuda")
    assert gpu["workspace"] == tokens * 256 * 2 + tokens * 64 * 4 and gpu["candidates"] == (3 + 5) * 64 * 256 * 4
    assert gpu["statistics"] == one["statistics"]
    # the option moves the CPU onto the GPU's phases and back (the update chunks stay the device's own)
    phases = ("workspace", "statistics", "candidates")
    recompute = pruning_memory_of(tiny_folder, tokens=tokens, method="sparsellm", preactivations="recompute")
    keep = pruning_memory_of(tiny_folder, tokens=tokens, method="sparsellm", device="cuda", preactivations="keep")
    assert [recompute[k] for k in phases] == [gpu[k] for k in phases] and recompute["chunks"] == one["chunks"]
    assert [keep[k] for k in phases] == [one[k] for k in phases] and keep["chunks"] == gpu["chunks"]
    # with more iterations, the passes before the last keep every auxiliary and two candidates
    four = pruning_memory_of(tiny_folder, tokens=tokens, method="sparsellm", device="cuda", iterations=4)
    assert four["workspace"] == one["workspace"] and four["statistics"] == one["statistics"]
    assert four["candidates"] == (2 * 3 + 5) * 64 * 256 * 4 and four["total"] > gpu["total"]
    short = pruning_memory_of(tiny_folder, tokens=256, method="sparsellm", device="cuda")   # few tokens: solves dominate
    assert short["workspace"] == 256 * 256 * 2 + 256 * 64 * 4
    assert short["candidates"] == (3 + 5) * 64 * 256 * 4 and short["statistics"] == 3 * 256 * 256 * 4 + 3 * 64 * 256 * 4
    layerwise = pruning_memory_of(tiny_folder, tokens=tokens, method="sparsegpt")
    assert layerwise["workspace"] < one["workspace"] and layerwise["candidates"] == 0
