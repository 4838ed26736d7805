"""The perplexity-vs-sparsity runner and its table/plot, on a tiny model with the smoke profile."""

from __future__ import annotations

import json

from tiny_lm import save_tiny, tiny_tokenizer

from benchmarks import plot_ppl, ppl_vs_sparsity
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
