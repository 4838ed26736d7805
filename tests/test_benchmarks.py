"""The perplexity-vs-sparsity runner and its table/plot, on a tiny model with the smoke profile."""

from __future__ import annotations

import json

import torch
from tiny_lm import save_tiny, tiny_tokenizer

from benchmarks import bench_solvers, plot_ppl, ppl_vs_sparsity, study_tables
from sparsesolve.data import load_text


def test_runner_records_a_run_and_the_table_and_plot_read_it(tmp_path) -> None:
    model = save_tiny(tmp_path / "tiny", "gpt2", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    results = tmp_path / "ppl"
    dense = ppl_vs_sparsity.dense(str(model), "smoke", results)
    ppl_vs_sparsity.one(str(model), "smoke", "full", "sparsegpt", "2:4", results, {}, "")
    run = json.loads((results / "smoke_full_sparsegpt_2-4.json").read_text())
    assert run["sparsity"] == 0.5 and set(run["layer_sparsity"].values()) == {0.5}
    assert run["nonfinite"] is False and run["escalations"] == 0
    assert set(run["perplexity"]) == {"wiki", "ptb"} == set(dense["perplexity"])
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


def test_ast_benchmark_smoke(tmp_path, monkeypatch) -> None:
    """Every run of the AST benchmark on a tiny model: one JSON each with its curve from step 0, and the plot."""
    import sys

    from benchmarks import bench_ast

    model = save_tiny(tmp_path / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    out = tmp_path / "ast"
    monkeypatch.setattr(sys, "argv", ["bench_ast", "--model", str(model), "--tokens", "256", "--seq-len", "32",
                                      "--batch-size", "4", "--eval-every", "1", "--fixed-mask-steps", "1", "--nsamples", "2",
                                      "--eval-windows", "1", "--test-seq-len", "64", "--work", str(tmp_path / "work"),
                                      "--out", str(out), "--runs", "magnitude,sparsegpt,sparsegpt-no-kd,sparsegpt-no-slorb"])
    bench_ast.main()
    runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(runs) == {"dense", "magnitude", "sparsegpt", "sparsegpt-no-kd", "sparsegpt-no-slorb"}
    assert runs["sparsegpt"]["log"][0]["tokens"] == 0 and runs["sparsegpt"]["slorb_parameters"] > 0
    assert runs["sparsegpt-no-slorb"]["slorb_parameters"] == 0 and runs["sparsegpt-no-kd"]["config"]["distill"] is False
    assert all(r["log"][-1]["tokens"] == 256 for name, r in runs.items() if name != "dense")
    assert (tmp_path / "ast_ppl_vs_tokens.png").exists()
    rows = bench_ast.table(out).splitlines()[2:6]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["magnitude", "sparsegpt", "sparsegpt-no-kd",
                                                                  "sparsegpt-no-slorb"]
    assert "no KD" in rows[2] and "no SLoRB" in rows[3] and rows[0].split(" | ")[6] == "-"
