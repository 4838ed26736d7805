"""The perplexity-vs-sparsity runner and its table/plot, on a tiny model with the smoke profile."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_lm import VOCAB, save_tiny, tiny_model, tiny_tokenizer

from benchmarks import bench_solvers, plot_ppl, ppl_vs_sparsity, profile_sparsellm, study_tables
from sparsesolve.core.config import COORDINATED_FFN_SCALE
from sparsesolve.lm.corpora import load_text
from sparsesolve.lm.models import load_model


def test_runner_records_a_run_and_the_table_and_plot_read_it(tmp_path) -> None:
    model = save_tiny(tmp_path / "tiny", "gpt2", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    results = tmp_path / "ppl"
    dense = ppl_vs_sparsity.dense(str(model), "smoke", results)
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsegpt", "2:4", results, {}, "")
    run = json.loads((results / "smoke_full_sparsegpt_2-4.json").read_text())
    assert run["sparsity"] == 0.5 and set(run["layer_sparsity"].values()) == {0.5}
    assert run["nonfinite"] is False and run["escalations"] == 0
    assert set(run["perplexity"]) == {"wiki", "ptb", "code"} == set(dense["perplexity"])
    assert run["allocation"] == "uniform" and run["heldout_fraction"] == 0.0 and run["code_corpus"].startswith("torch")
    assert run["seconds"]["prune"] >= run["seconds"]["solve"] > 0 and run["peak_memory_mb"]["prune"] > 0
    table = plot_ppl.table("smoke", "full", results)
    assert "| sparsegpt | - | - | - | - | - | " in table and f"{run['perplexity']['wiki']:.1f}" in table
    assert plot_ppl.plot("smoke", "full", results, out=tmp_path).exists()
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsellm", "2:4", results, {"alpha": 1.0}, "alpha1")
    study = json.loads((results / "smoke_full_sparsellm_2-4_alpha1.json").read_text())
    assert study["sparsellm_options"]["alpha"] == 1.0 and study["sparsellm_options"]["iterations"] == 1
    assert "| sparsellm |" not in plot_ppl.table("smoke", "full", results)
    goals = study_tables.goals_table("smoke", "full", results)
    assert "| 2:4 (2-4_alpha1) |" in goals and f"{study['perplexity']['wiki']:.1f}" in goals
    assert study_tables.layer_table("smoke", "full", results).count("->") == 2  # two decoder layers, one run
    # an allocation run: its own file, recorded layer sparsities averaging the target, and its table row
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsegpt", "0.6", results, {}, "", "owl")
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsegpt", "0.6", results, {}, "")
    owl = json.loads((results / "smoke_full_sparsegpt_0.6_owl.json").read_text())
    assert owl["allocation"] == "owl" and len(set(owl["layer_sparsity"].values())) == 2
    assert abs(sum(owl["layer_sparsity"].values()) / 2 - 0.6) < 1 / 64      # rows of 64 inputs round their zeros
    table = study_tables.allocation_table("smoke", "full", results)
    assert "| sparsegpt | 0.6 | owl |" in table and "| sparsegpt | 0.6 | uniform |" in table
    # another range: its own file and row, the layers further apart, the average still the target
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsegpt", "0.6", results, {}, "", "owl", allocation_range=0.2)
    wide = json.loads((results / "smoke_full_sparsegpt_0.6_owl_range0.2.json").read_text())
    assert wide["allocation_range"] == 0.2 and abs(sum(wide["layer_sparsity"].values()) / 2 - 0.6) < 1 / 64
    spread = {name: max(r["layer_sparsity"].values()) - min(r["layer_sparsity"].values()) for name, r in (("owl", owl), ("wide", wide))}
    assert spread["wide"] > spread["owl"] + 0.1
    assert "| sparsegpt | 0.6 | owl_range0.2 |" in study_tables.allocation_table("smoke", "full", results)
    # a mask-selection variant: per-layer counting and the dense layer pass, in their own file and table
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsegpt", "0.6", results, {}, "", "uniform", "layer", False)
    variant = json.loads((results / "smoke_full_sparsegpt_0.6_layermask_densepass.json").read_text())
    assert variant["mask_scope"] == "layer" and variant["true_sequential"] is False
    assert len(set(variant["layer_sparsity"].values())) == 1 and abs(variant["sparsity"] - 0.6) < 1e-3
    table = study_tables.selection_table("smoke", "full", results)
    assert "| sparsegpt | 0.6 | layer | dense layer pass |" in table and "| sparsegpt | 0.6 | row | pruned predecessors |" in table
    # mixed calibration corpora and sparsellm's inner solver: their own files, compared with sparsegpt on the same corpora
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsegpt", "0.6", results, {}, "", calib="wiki,ptb")
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsellm", "0.6", results, {}, "", solver="wanda", calib="wiki,ptb")
    mixed = json.loads((results / "smoke_full_sparsegpt_0.6_calib-wiki+ptb.json").read_text())
    inner = json.loads((results / "smoke_full_sparsellm_0.6_wanda_calib-wiki+ptb.json").read_text())
    assert mixed["calibration"]["calib"] == inner["calibration"]["calib"] == "wiki,ptb" and inner["solver"] == "wanda"
    plain = json.loads((results / "smoke_full_sparsegpt_0.6.json").read_text())
    assert mixed["perplexity"] != plain["perplexity"]     # other calibration windows, another pruned model
    row = f"| 0.6 (0.6_wanda_calib-wiki+ptb) | {mixed['perplexity']['wiki']:.1f} / "
    assert row in study_tables.goals_table("smoke", "full", results)


def test_solver_benchmark_on_real_layers(tmp_path) -> None:
    """The real-layer problems are the model's own weights with the Gram of each linear's inputs (the
    attention projections share theirs); an exact refit on the magnitude mask is never worse than it."""
    model = save_tiny(tmp_path / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    problems = bench_solvers.real_problems(str(model), 1, 2, 64)
    grams = {name.rsplit(".", 1)[-1]: gram for name, _, gram in problems}
    assert set(grams) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"}
    assert torch.equal(grams["q_proj"], grams["v_proj"]) and torch.equal(grams["up_proj"], grams["gate_proj"])
    assert all(torch.allclose(g, g.T) and torch.linalg.eigvalsh(g.double()).min() > -1e-6 * g.diag().max() for g in grams.values())
    rows = bench_solvers.run(problems[-1:], ["0.5"], repeats=1)
    error = {r["solver"]: r["relative_error"] for r in rows}
    assert error["refit(magnitude mask)"] <= error["magnitude"] + 1e-9 and error["sparsegpt"] < error["magnitude"]


def test_heldout_ffn_error_matches_a_hand_computation(tmp_path) -> None:
    """The held-out FFN error is ``||F(X) - F_hat(X)||^2 / ||F(X)||^2`` over every token the pruned FFN sees
    (X captured separately here), zero for an unpruned FFN, and the hook is removed afterwards."""
    import copy

    folder = save_tiny(tmp_path / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    model, _ = load_model(str(folder))
    ffn = model.model.layers[1].mlp
    dense = copy.deepcopy(ffn)
    windows = torch.randint(0, model.config.vocab_size, (3, 16))
    assert profile_sparsellm.heldout_ffn_error(model, dense, ffn, windows) == 0.0
    with torch.no_grad():
        ffn.down_proj.weight[:, ::2] = 0
    inputs = []
    handle = ffn.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].double()))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    with torch.no_grad():
        target, pruned = copy.deepcopy(dense).double()(x), copy.deepcopy(ffn).double()(x)
    expected = float((target - pruned).pow(2).sum() / target.pow(2).sum())
    got = profile_sparsellm.heldout_ffn_error(model, dense, ffn, windows)
    assert 0 < expected and abs(got - expected) <= 1e-4 * expected
    assert not ffn._forward_hooks


def test_ast_benchmark_smoke(tmp_path, monkeypatch) -> None:
    """Every run of the AST benchmark on a tiny model: one JSON each with its curve from step 0, and the plot."""
    import sys

    from benchmarks import bench_ast

    model = save_tiny(tmp_path / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    out = tmp_path / "ast"
    monkeypatch.setattr(sys, "argv", ["bench_ast", "--model", str(model), "--tokens", "256", "--seq-len", "32",
                                      "--batch-size", "4", "--eval-every", "1", "--fixed-mask-steps", "1", "--nsamples", "2",
                                      "--eval-windows", "1", "--test-seq-len", "64", "--work", str(tmp_path / "work"),
                                      "--out", str(out), "--runs",
                                      "magnitude,sparsegpt,sparsegpt-no-kd,sparsegpt-no-slorb,sparsegpt-gradient-decay"])
    bench_ast.main()
    runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(runs) == {"dense", "magnitude", "sparsegpt", "sparsegpt-no-kd", "sparsegpt-no-slorb", "sparsegpt-gradient-decay"}
    assert runs["sparsegpt"]["decay"] == "update" and runs["sparsegpt-gradient-decay"]["decay"] == "gradient"
    assert runs["sparsegpt"]["slorb_init_abs_mean"] > 0 and runs["sparsegpt-no-slorb"]["slorb_init_abs_mean"] is None
    assert runs["sparsegpt"]["log"][0]["tokens"] == 0 and runs["sparsegpt"]["slorb_parameters"] > 0
    assert runs["sparsegpt-no-slorb"]["slorb_parameters"] == 0 and runs["sparsegpt-no-kd"]["config"]["distill"] is False
    assert all(r["log"][-1]["tokens"] == 256 for name, r in runs.items() if name != "dense")
    assert (tmp_path / "ast_ppl_vs_tokens.png").exists()
    rows = bench_ast.table(out).splitlines()[2:6]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["magnitude", "sparsegpt", "sparsegpt-no-kd",
                                                                  "sparsegpt-no-slorb"]
    assert "no KD" in rows[2] and "no SLoRB" in rows[3] and rows[0].split(" | ")[8] == "-"


def test_heldout_table_reports_the_change_per_corpus(tmp_path) -> None:
    """One row per sparsellm variant of a held-out study, change relative to the sparsegpt row; studies
    without held-out errors are left out, and none at all is a missing result."""
    def row(cal: float, wiki: float, ptb: float) -> dict:
        return {"ffn": {"relative_error": cal}, "heldout_ffn_error": {"wiki": wiki, "ptb": ptb}}

    settings = {"layer": 3, "sparsity": "4:8"}
    (tmp_path / "study_a.json").write_text(json.dumps({"settings": settings, "rows": {
        "sparsegpt": row(0.2, 0.4, 0.5), "default": row(0.1, 0.3, 0.55)}}))
    (tmp_path / "study_b.json").write_text(json.dumps({"settings": settings | {"layer": 5}, "rows": {
        "sparsegpt": {"ffn": {"relative_error": 0.2}}, "default": {"ffn": {"relative_error": 0.1}}}}))
    with pytest.raises(FileNotFoundError):
        study_tables.heldout_table(tmp_path / "none")
    table = study_tables.heldout_table(tmp_path)
    assert "| 3 | 4:8 | default | 0.2000 -> 0.1000 (-50%) | 0.4000 -> 0.3000 (-25%) | 0.5000 -> 0.5500 (+10%) | - |" in table
    assert table.count("\n") == 3
    # variants fitted without a share of the windows: the one with the lowest error on it is marked
    split = {"sparsegpt": row(0.2, 0.4, 0.5)}
    for name, own in (("a0.1", 0.30), ("a1", 0.25)):
        split[name] = row(0.1, 0.3, 0.5)
        split[name]["ffn"]["heldout_relative_error"] = own
    (tmp_path / "study_c.json").write_text(json.dumps({"settings": settings | {"layer": 7}, "rows": split}))
    table = study_tables.heldout_table(tmp_path)
    assert "| 7 | 4:8 | a0.1 |" in table and table.split("| 7 | 4:8 | a1 |")[1].split("\n")[0].endswith("| 0.2500 (its choice) |")
    assert table.split("| 7 | 4:8 | a0.1 |")[1].split("\n")[0].endswith("| 0.3000 |")


def test_coordinator_scale_benchmark_smoke(tmp_path, monkeypatch) -> None:
    """A synthetic FFN row and the whole-model timing on a tiny random Llama: the issue's fields, both methods."""
    import sys

    from benchmarks import bench_coordinator_scale

    monkeypatch.setattr(sys, "argv", ["bench_coordinator_scale", "--widths", "64x128", "--tokens", "512", "--patterns",
                                      "2:4", "--threads", "1", "--count-ops", "--whole-model", "--model-shape", "64x128", "--model-layers",
                                      "1", "--model-windows", "2", "--model-seq-len", "32", "--preactivations",
                                      "keep,recompute", "--out", str(tmp_path)])
    bench_coordinator_scale.main()
    data = json.loads((tmp_path / "coordinator_scale.json").read_text())
    (row,) = data["rows"]
    for key in ("d_model", "d_ff", "tokens", "pattern", "device", "threads", "sparsegpt_s", "sparsellm_s",
                "sparsegpt_error", "sparsellm_error"):
        assert key in row
    assert (row["d_model"], row["d_ff"], row["tokens"], row["device"]) == (64, 128, 512, "cpu")
    assert row["sparsellm_error"] <= row["sparsegpt_error"] and row["sparsellm_profile"]["ops"] > row["sparsegpt_profile"]["ops"] > 0
    whole = data["whole_model"]
    assert [(r["method"], r["preactivations"]) for r in whole] == [("sparsegpt", None), ("sparsellm", "keep"),
                                                                   ("sparsellm", "recompute")]
    assert all(r["predicted_gb"] > 0 for r in whole) and whole[1]["predicted_gb"] > whole[0]["predicted_gb"]
    table = bench_coordinator_scale.table(tmp_path)
    assert "| 64 x 128 | synthetic | 512 | 2:4 |" in table
    assert "| Llama 64x128 (1) | 64 | 2:4 | cpu | float32 | keep |" in table
    assert "| Llama 64x128 (1) | 64 | 2:4 | cpu | float32 | recompute |" in table
    assert row["sparsellm_peak_gb"] >= 0 and whole[0]["peak_resident_gb"] > 0


def test_distributed_benchmark_smoke(tmp_path, monkeypatch, tiny_folder) -> None:
    """One rank and two ranks under torchrun on the tiny Llama's first layer: the issue's fields, equal weights."""
    import sys

    from benchmarks import bench_distributed

    monkeypatch.setattr(sys, "argv", ["bench_distributed", "--model", str(tiny_folder), "--nsamples", "4", "--seq-len",
                                      "32", "--layers", "0:1", "--batch-size", "2", "--chunk-size", "64", "--out", str(tmp_path)])
    bench_distributed.main()
    rows = json.loads((tmp_path / "distributed.json").read_text())["rows"]
    for key in ("ranks", "threads_per_rank", "tokens", "method", "pattern", "wall_s", "peak_rss_mb_per_rank",
                "max_rel_weight_diff_vs_single"):
        assert all(key in row for row in rows)
    assert [r["ranks"] for r in rows] == [1, 2] and rows[0]["max_rel_weight_diff_vs_single"] == 0
    # shares of 2 windows of 32 tokens are whole batches and chunks of the one-rank run: the same sums
    assert rows[1]["max_rel_weight_diff_vs_single"] < 1e-6 and rows[1]["identical_mask_fraction"] == 1
    assert "| 2 x 1 | 128 | sparsellm | 2:4 |" in bench_distributed.table(tmp_path)


def test_an_allocation_run_is_compared_with_the_uniform_run_of_its_own_ridge(tmp_path) -> None:
    """sparsellm's default ridge changed between runs: a variant pairs with the plain run of the same ridge
    (the earlier plain runs kept as ``_ridgenone``), not with whatever the plain name holds now."""
    def write(suffix: str, wiki: float, ridge: float | None, spread: tuple[float, float], **extra: float) -> None:
        options = ({"iterations": 1} if ridge is None else {"iterations": 1, "ridge": ridge}) | extra
        (tmp_path / f"smoke_full_sparsellm_0.6{suffix}.json").write_text(json.dumps(
            {"pattern": "0.6", "perplexity": {"wiki": wiki}, "sparsellm_options": options,
             "layer_sparsity": dict(enumerate(spread))}))

    write("", 100.0, 0.1, (0.6, 0.6))
    write("_ridgenone", 80.0, None, (0.6, 0.6))
    write("_fisher", 60.0, None, (0.5, 0.7))
    write("_owl", 90.0, 0.1, (0.55, 0.65))
    table = study_tables.allocation_table("smoke", "full", tmp_path)
    assert "| sparsellm | 0.6 | fisher | 0.500-0.700 | 60.0 | -25% |" in table      # against ridgenone's 80
    assert "| sparsellm | 0.6 | owl | 0.550-0.650 | 90.0 | -10% |" in table         # against the plain 100
    assert "| sparsellm | 0.6 | uniform (ridgenone) |" in table and "| sparsellm | 0.6 | uniform |" in table
    # a ridge limited to sparsities below 0.5 was not in force at 0.6: the run pairs with ridgenone
    write("_obs", 72.0, 0.1, (0.55, 0.65), ridge_below=0.5)
    assert "| sparsellm | 0.6 | obs | 0.550-0.650 | 72.0 | -10% |" in study_tables.allocation_table("smoke", "full", tmp_path)


def test_a_per_linear_allocation_run_has_its_own_file_and_table_row(tmp_path) -> None:
    name = ppl_vs_sparsity.run_name("smoke", "full", "sparsellm", "0.6", allocation="fisher", allocation_range=0.2,
                                    allocation_unit="linear")
    assert name == f"smoke_full_sparsellm_0.6_fisher-linear_range0.2_ffn{COORDINATED_FFN_SCALE:g}"   # sparsellm's default
    assert ppl_vs_sparsity.run_name("smoke", "full", "sparsellm", "0.6", allocation="fisher", allocation_range=0.2,
                                    allocation_unit="linear", allocation_ffn_scale=1) == "smoke_full_sparsellm_0.6_fisher-linear_range0.2"
    assert ppl_vs_sparsity.run_name("smoke", "full", "sparsellm", "0.6", allocation_unit="linear") == "smoke_full_sparsellm_0.6"
    for stem, wiki, spread in (("", 100.0, (0.6, 0.6)), ("_fisher", 90.0, (0.5, 0.7)), ("_fisher-linear", 70.0, (0.55, 0.65)),
                               ("_fisher-linear_range0.2", 60.0, (0.45, 0.75))):
        (tmp_path / f"smoke_full_sparsegpt_0.6{stem}.json").write_text(json.dumps(
            {"pattern": "0.6", "perplexity": {"wiki": wiki}, "sparsellm_options": None, "layer_sparsity": dict(enumerate(spread))}))
    table = study_tables.allocation_table("smoke", "full", tmp_path)
    assert "| sparsegpt | 0.6 | fisher | 0.500-0.700 | 90.0 | -10% |" in table
    assert "| sparsegpt | 0.6 | fisher-linear | 0.550-0.650 | 70.0 | -30% |" in table
    assert "| sparsegpt | 0.6 | fisher-linear_range0.2 | 0.450-0.750 | 60.0 | -40% |" in table
    scaled = ppl_vs_sparsity.run_name("smoke", "full", "sparsegpt", "0.6", allocation="fisher", allocation_range=0.2,
                                      allocation_unit="linear", allocation_ffn_scale=0.5)
    assert scaled == "smoke_full_sparsegpt_0.6_fisher-linear_range0.2_ffn0.5"
    (tmp_path / f"{scaled}.json").write_text(json.dumps(
        {"pattern": "0.6", "perplexity": {"wiki": 55.0}, "sparsellm_options": None, "layer_sparsity": {"0": 0.5, "1": 0.7}}))
    assert "| sparsegpt | 0.6 | fisher-linear_range0.2_ffn0.5 | 0.500-0.700 | 55.0 | -45% |" in \
        study_tables.allocation_table("smoke", "full", tmp_path)


def test_allocation_estimate_per_linear_is_never_worse_than_per_layer(tmp_path) -> None:
    """The layer unit is the linear unit held to one sparsity per layer: on the same Fisher curves the
    linear unit's estimate can only be lower (to the grid's rounding), and both at most uniform's."""
    from benchmarks import allocation_estimate

    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    result = allocation_estimate.estimate(tiny_model("llama", layers=3), windows, [0.6], [0.1, 0.2], batch_size=4)
    rows = {(r["unit"], r["range"]): r for r in result["rows"]}
    for spread in (0.1, 0.2):
        layer, linear = rows[("layer", spread)], rows[("linear", spread)]
        assert linear["predicted_loss_increase"] <= layer["predicted_loss_increase"] * 1.01
        assert layer["predicted_loss_increase"] <= layer["uniform_loss_increase"] * 1.01
        assert 0.6 - spread - 1e-9 <= linear["min"] < linear["max"] <= 0.6 + spread + 1e-9
    assert set(result["by_type"]["0.6_range0.1"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "| 0.6 | 0.1 |" in allocation_estimate.table(result)
