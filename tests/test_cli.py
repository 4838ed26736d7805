"""The command line: a full run on a tiny model, one-line errors, and resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparsesolve.cli import main

ROOT = Path(__file__).resolve().parents[1]


def prune_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--out", str(out), "--nsamples", "8", "--seq-len", "64",
            "--calib", "ptb", "--quiet", *extra]


def test_prune_writes_a_complete_reloadable_folder(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    args = prune_args(tiny_folder, out, "--method", "sparsegpt", "--pattern", "2:4", "--data", "ptb", "--eval-windows", "4")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "perplexity ptb: dense" in printed and "sparsity 0.5000" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "2:4" and report["sparsity"] == 0.5 and report["layers"] == list(range(6))
    assert set(report["perplexity"]["pruned"]) == {"ptb"} and report["perplexity"]["pruned"]["ptb"] > 1
    assert report["seconds"]["forward"] > 0 and report["peak_memory_mb"] > 0
    assert not (tmp_path / "pruned.partial").exists() and not (out / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_file(str(out / "masks.safetensors"))
    assert len(masks) == 6 * 7
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert bool((weight[~mask] == 0).all()) and int(mask.sum()) == mask.numel() // 2
    # an existing folder is refused, then replaced with --overwrite
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--method", "magnitude"]) == 0
    assert json.loads((out / "report.json").read_text())["method"] == "magnitude"


def test_prune_with_joint_quantisation(tiny_folder: Path, tmp_path: Path) -> None:
    """--wbits 4: every pruned linear has at most 16 distinct values per row and group of 32 inputs."""
    out = tmp_path / "quantised"
    args = prune_args(tiny_folder, out, "--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4", "--groupsize", "32",
                      "--data", "none")
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["quantization"] == {"bits": 4, "groupsize": 32}
    model = AutoModelForCausalLM.from_pretrained(out)
    for name in load_file(str(out / "masks.safetensors")):
        weight = model.get_submodule(name).weight.detach()
        groups = weight.reshape(weight.shape[0], -1, 32)
        assert max(len(torch.unique(g)) for row in groups for g in row) <= 16


@pytest.mark.parametrize(("extra", "message"), [
    (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["--pattern", "5:4"], "N:M"),
    (["--pattern", "two:four"], "pattern"),
    (["--pattern", "3:7"], "multiple of 7"),
    (["--sparsity", "0.5", "--seq-len", "4096"], "longer than the model's context"),
    (["--sparsity", "0.5", "--nsamples", "0"], "--nsamples must be >= 1"),
    (["--sparsity", "0.5", "--layers", "9"], "must select layers in 0..5"),
    (["--sparsity", "0.5", "--method", "wanda", "--iterations", "2"], "--iterations applies to --method sparsellm only"),
    (["--sparsity", "0.5", "--method", "sparsellm", "--wbits", "4"], "--wbits (joint quantisation) needs --method sparsegpt"),
    (["--sparsity", "0.5", "--method", "sparsegpt", "--wbits", "12"], "wbits must be between 2 and 8"),
    (["--pattern", "2:4", "--allocation", "owl"], "allocation: 'owl' spreads an unstructured sparsity"),
    (["--pattern", "2:4", "--mask-scope", "layer"], "mask_scope: 'layer' counts an unstructured sparsity"),
    (["--sparsity", "0.5", "--allocation", "owl", "--allocation-ffn-scale", "0.5"],
     "allocation_ffn_scale: scales the fisher allocation's FFN curves; allocation 'owl' has none"),
    (["--sparsity", "0.5", "--heldout-fraction", "1"], "heldout_fraction must be in [0, 1)"),
    (["--sparsity", "0.5", "--nsamples", "2", "--heldout-fraction", "0.9"], "leaves none to fit"),
    (["--sparsity", "0.5", "--calib", "wiki,novels"], "unknown corpus 'novels'"),
])
def test_bad_input_is_one_line_with_nothing_left_behind(tiny_folder: Path, tmp_path: Path, capsys, extra, message) -> None:
    out = tmp_path / "out"
    assert main(prune_args(tiny_folder, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsesolve: error:") and message in err and "\n" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["prune", "--model", "no-such-model", "--sparsity", "0.5", "--out", "X"], "cannot load model 'no-such-model'"),
    (["prune", "--method", "obs", "--sparsity", "0.5", "--out", "X"], "invalid choice: 'obs'"),
    (["prune", "--sparsity", "0.5", "--allocation", "fisher", "--allocation-unit", "expert", "--out", "X"],
     "invalid choice: 'expert'"),
    (["prune", "--sparsity", "0.5"], "--out"),
    (["eval", "--model", "M", "--data", "wikitext9"], "unknown corpus 'wikitext9'"),
])
def test_usage_errors_are_one_line(argv: list[str], message: str, capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as stop:       # argparse's own usage errors
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_eval_prints_perplexity(tiny_folder: Path, capsys) -> None:
    assert main(["eval", "--model", str(tiny_folder), "--data", "ptb", "--seq-len", "64", "--eval-windows", "3", "--quiet"]) == 0
    assert "perplexity ptb (3 windows of 64):" in capsys.readouterr().out


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "sparsesolve", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_resume_after_a_kill_gives_the_same_weights(tiny_folder: Path, tmp_path: Path) -> None:
    common = ["--method", "sparsellm", "--sparsity", "0.7", "--iterations", "6", "--data", "none", "--threads", "1"]
    straight = _run_cli(prune_args(tiny_folder, tmp_path / "straight", *common))
    killed = tmp_path / "killed"
    victim = _run_cli(prune_args(tiny_folder, killed, *common))
    checkpoints = tmp_path / "killed.partial" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("layer_0001.pt")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = sorted(p.name for p in checkpoints.glob("layer_*.pt"))
    assert 2 <= len(done) < 6, f"the kill should land part-way through the 6 layers, got {done}"
    assert not killed.exists()
    refused = _run_cli(prune_args(tiny_folder, killed, *common))
    assert refused.wait() == 2 and b"pass --resume" in refused.stderr.read()
    resumed = _run_cli(prune_args(tiny_folder, killed, *common, "--resume"))
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    assert straight.wait() == 0, straight.stderr.read().decode()
    report = json.loads((killed / "report.json").read_text())
    assert report["resumed_layers"] == list(range(len(done)))
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsesolve: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_what_a_new_user_hits_is_one_line_and_exit_2(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("not a folder")
    assert main(prune_args(tiny_folder, readme / "out", "--sparsity", "0.5")) == 2
    assert "is a file" in _one_line_error(capsys)
    assert main(prune_args(tiny_folder, Path("/proc/sparsesolve-out"), "--sparsity", "0.5")) == 2
    assert "cannot write in /proc" in _one_line_error(capsys)
    assert main(prune_args(tmp_path / "nonexistent", tmp_path / "out", "--sparsity", "0.5")) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(prune_args(tiny_folder, tmp_path / "out", "--sparsity", "2:4")) == 2
    assert "--pattern 2:4" in _one_line_error(capsys)
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "small")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_folder.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(prune_args(broken, tmp_path / "out", "--sparsity", "0.5")) == 2
    assert "truncated or corrupt" in _one_line_error(capsys)
    assert main(["eval", "--model", str(broken), "--data", "ptb", "--quiet"]) == 2
    assert "truncated or corrupt" in _one_line_error(capsys)
    (broken / "masks.safetensors").write_bytes(b"")
    assert main(["export", "--model", str(broken), "--out", str(tmp_path / "out-small")]) == 2
    assert "truncated or corrupt" in _one_line_error(capsys)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys; from sparsesolve.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    help_text = subprocess.run([sys.executable, "-m", "sparsesolve", "prune", "--help"], check=True, cwd=ROOT,
                               capture_output=True, text=True).stdout
    assert "--iterations" in help_text and "0-based, B excluded" in help_text


@pytest.mark.parametrize(("given", "expected"), [([], 0.1), (["--ridge", "0.3"], 0.3), (["--ridge", "none"], None)])
def test_a_flag_that_may_be_none_takes_none(given: list[str], expected: float | None) -> None:
    """``--ridge none`` restores damping toward zero; not given, the language-model default holds."""
    from sparsesolve.cli import _prune_config, build_parser

    args = build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--sparsity", "0.7", *given])
    assert _prune_config(args).coordinator(True).ridge == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--sparsity", "0.7", "--ridge", "big"])


def test_a_per_linear_allocation_of_an_moe_model_is_refused_with_nothing_left_behind(tmp_path: Path, capsys) -> None:
    from tiny_lm import VOCAB, tiny_tokenizer

    from benchmarks.architecture_census import tiny_config
    from sparsesolve.lm.data import load_text

    config = tiny_config("mixtral")
    config.vocab_size = VOCAB
    folder = tmp_path / "moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer(load_text("wiki", "train")[:20_000]).save_pretrained(folder)
    args = prune_args(folder, tmp_path / "out", "--sparsity", "0.5", "--allocation", "owl", "--allocation-unit", "linear")
    capsys.readouterr()                                         # the save's progress bars
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "allocation_unit 'linear'" in err and "layer 0 has MoE experts" in err and "\n" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]      # no output folder, not even a partial one


def test_a_per_linear_allocation_is_reported_by_linear(tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    args = prune_args(tiny_folder, out, "--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "owl",
                      "--allocation-unit", "linear", "--allocation-range", "0.1", "--layers", "0:2", "--eval-windows", "2")
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    allocation, masks = report["allocation"], load_file(str(out / "masks.safetensors"))
    assert allocation["unit"] == "linear" and set(allocation["linear_sparsity"]) == set(masks)
    assert allocation["ffn_scale"] == 1.0
    for name, mask in masks.items():
        assert abs(float((mask == 0).sum()) / mask.numel() - allocation["linear_sparsity"][name]) <= 0.5 / mask.shape[1] + 1e-9
