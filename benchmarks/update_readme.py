"""Regenerate the README's result tables from ``benchmarks/results/*.json`` (never edit them by hand).

    python -m benchmarks.update_readme

Each table lives between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers in README.md (the
results) or benchmarks/README.md (the SparseLLM study, ``study_tables``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import allocation_estimate
from benchmarks.architecture_census import table as census_table
from benchmarks.bench_ast import table as ast_table
from benchmarks.bench_compressed_tensors import table as compressed_tensors_table
from benchmarks.bench_coordinator_scale import table as scale_table
from benchmarks.bench_distributed import table as distributed_table
from benchmarks.common import RESULTS
from benchmarks.plot_ppl import table as ppl_table
from benchmarks.study_tables import allocation_table, goals_table, heldout_table, layer_table, selection_table, variant_table

README = Path(__file__).resolve().parent.parent / "README.md"
STUDY = Path(__file__).resolve().parent / "README.md"


def _source(meta: dict) -> str:
    m = meta["machine"]
    return (f"\n_Source: `{meta['command']}` at commit `{meta['commit'][:12]}`, {meta['date']}; "
            f"{m['cpus']} CPUs, {m['torch_threads']} torch threads, torch {meta['versions']['torch']}._\n")


def optimality_gap_table() -> str:
    """Median / 90th percentile / max gap and share of problems solved to optimality, per solver."""
    data = json.loads((RESULTS / "optimality_gap.json").read_text())
    lines = ["| pattern | solver | median gap | p90 gap | max gap | within 0.1 % of optimum |",
             "|---|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['pattern']} | {r['solver']} | {r['median']:.3f} | {r['p90']:.3f} | {r['max']:.3f} | "
                     f"{r['optimal_fraction']:.0%} |")
    return "\n".join(lines) + "\n" + _source(data["meta"])


def solver_table() -> str:
    """Seconds and relative error per layer (real or synthetic), pattern and solver (every ``bench_solvers*.json``)."""
    runs = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("bench_solvers*.json"))]
    if not runs:
        raise FileNotFoundError("bench_solvers*.json")
    rows = [r | {"layer": r.get("layer", "synthetic")} for run in runs for r in run["rows"]]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    lines = ["| layer | shape (out x in) | pattern | " + " | ".join(solvers) + " |", "|---|---|---|" + "---:|" * len(solvers)]
    for layer, shape, pattern in dict.fromkeys((r["layer"], tuple(r["shape"]), r["pattern"]) for r in rows):
        cells = {r["solver"]: r for r in rows if (r["layer"], tuple(r["shape"]), r["pattern"]) == (layer, shape, pattern)}
        row = [f"{cells[s]['relative_error']:.4f} ({cells[s]['seconds']:.2f} s)" if s in cells else "" for s in solvers]
        lines.append(f"| {layer} | {shape[0]} x {shape[1]} | {pattern} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n" + "".join(_source(run["meta"]) for run in runs)


def mlp_table() -> str:
    """Relative output error (calibration / held-out) per model, method and pattern."""
    data = json.loads((RESULTS / "mlp_methods.json").read_text())
    patterns = list(dict.fromkeys(r["pattern"] for r in data["rows"]))
    lines = ["| model | method | " + " | ".join(patterns) + " | time |", "|---|---|" + "---:|" * (len(patterns) + 1)]
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in data["rows"]):
        mine = [r for r in data["rows"] if r["model"] == model and r["method"] == method]
        cells = [f"{r['calibration_error']:.4f} / {r['held_out_error']:.4f}" for r in mine]
        lines.append(f"| {model} | {method} | " + " | ".join(cells) + f" | {sum(r['seconds'] for r in mine):.1f} s |")
    return "\n".join(lines) + "\n" + _source(data["meta"])


def export_table() -> str:
    """On-disk bytes of the compressed export against the dense folders, per pattern (``export_sizes.json``)."""
    data = json.loads((RESULTS / "export_sizes.json").read_text())
    mib = 2**20
    lines = ["| pattern | sparsity of the pruned linears | dense float32 | dense float16 | compressed float32 | compressed float16 "
             "| bit-exact reload |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        f32, f16 = r["float32"], r["float16"]
        lines.append(f"| {r['pattern']} | {r['sparsity']:.3f} | {f32['dense_float32'] / mib:.1f} MiB "
                     f"| {f32['dense_float16'] / mib:.1f} MiB "
                     f"| {f32['compressed'] / mib:.1f} MiB ({f32['compressed'] / f32['dense_float32']:.0%}) "
                     f"| {f16['compressed'] / mib:.1f} MiB ({f16['compressed'] / f16['dense_float16']:.0%}) "
                     f"| {'yes' if f32['bit_exact'] and f16['bit_exact'] else 'NO'} |")
    return "\n".join(lines) + "\n" + _source(data["meta"])


def quantized_table() -> str:
    """Perplexity and size of the jointly sparse + quantised models (``quantized.json``)."""
    data = json.loads((RESULTS / "quantized.json").read_text())
    mib = 2**20
    lines = ["| configuration | wiki / PTB perplexity (dense) | wiki / PTB perplexity | compressed, rest float32 "
             "| compressed, rest float16 | dense float16 | dense float32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        dense, pruned, b = r["perplexity"]["dense"], r["perplexity"]["pruned"], r["bytes"]
        lines.append(f"| {r['config']} (groups of {r['groupsize']}) | {dense['wiki']:.1f} / {dense['ptb']:.1f} "
                     f"| {pruned['wiki']:.1f} / {pruned['ptb']:.1f} | {b['compressed'] / mib:.1f} MiB "
                     f"| {r['bytes_rest_float16'] / mib:.1f} MiB "
                     f"| {b['dense_float16'] / mib:.1f} MiB | {b['dense_float32'] / mib:.1f} MiB |")
    return "\n".join(lines) + "\n" + _source(data["meta"])


def lm_table() -> str:
    """One row per recorded ``sparsesolve prune`` run (``results/lm_*.json``)."""
    runs = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("lm_*.json"))]
    if not runs:
        raise FileNotFoundError("lm_*.json")
    lines = ["| model | method | pattern | layers | calibration | perplexity dense -> pruned | FFN error (median: start -> final) "
             "| prune time (forward / solves) | peak memory |", "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in runs:
        ppl = "; ".join(f"{k} {r['perplexity']['dense'][k]:.2f} -> {v:.2f}" for k, v in r["perplexity"]["pruned"].items())
        ppl = f"{ppl} ({r['evaluation']['windows']} x {r['evaluation']['seq_len']})" if ppl else "not evaluated"
        cal, sec = r["calibration"], r["seconds"]
        ffn = r["ffn_relative_error"]
        layers = r["layers"]
        span = f"{layers[0]}-{layers[-1]} ({len(layers)})" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
        lines.append(f"| {r['model']} | {r['method']} | {r['pattern']} | {span} | {cal['windows']} x {cal['seq_len']} {cal['corpus']} "
                     f"| {ppl} | {ffn['start_median']:.4f} -> {ffn['median']:.4f} "
                     f"| {sec['prune']:.0f} s ({sec['forward']:.0f} / {sec['solve']:.0f}) | {r['peak_memory_mb']:.0f} MiB |")
    sources = "".join(f"\n_Source: `{r['command']}` at commit `{r['commit'][:12]}`, {r['date']}; {r['machine']['cpus']} CPUs, "
                      f"{r['machine']['torch_threads']} torch threads, torch {r['versions']['torch']}._\n" for r in runs)
    return "\n".join(lines) + "\n" + sources


def allocation_estimate_table() -> str:
    """The Fisher estimate per unit and range (``results/allocation_estimate.json``) with its source."""
    path = RESULTS / "allocation_estimate.json"
    if not path.exists():
        raise FileNotFoundError(path)
    data = json.loads(path.read_text())
    return allocation_estimate.table(data) + _source(data["meta"])


TABLES = {"optimality-gap": optimality_gap_table, "solvers": solver_table, "mlp": mlp_table, "lm": lm_table,
          "ppl-full": lambda: ppl_table("p1", "full"), "ppl-first-half": lambda: ppl_table("p1", "first-half"),
          "goals-full": goals_table, "export-sizes": export_table,
          "quantized": quantized_table, "ast": ast_table, "coordinator-scale": scale_table,
          "census": census_table, "distributed": distributed_table,
          "compressed-tensors": compressed_tensors_table, "allocation": allocation_table, "selection": selection_table,
          "goals-small": lambda: goals_table("small", "full"), "allocation-estimate": allocation_estimate_table}
STUDY_TABLES = {"study-variants": variant_table, "study-goals": goals_table, "study-layers": layer_table,
                "study-heldout": heldout_table}


def fill(path: Path, tables: dict) -> None:
    """Replace every marked block of ``path`` whose JSON exists."""
    text = path.read_text()
    for name, build in tables.items():
        try:
            table = build()
        except FileNotFoundError:
            print(f"skipped {name}: no results yet")
            continue
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path} has no <!-- {name}:begin/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)
    path.write_text(text)
    print(f"updated {path}")


def main() -> None:
    """Fill the README's and the study's tables."""
    fill(README, TABLES)
    fill(STUDY, STUDY_TABLES)


if __name__ == "__main__":
    main()
