"""Tables and the plot of perplexity vs sparsity from ``benchmarks/results/ppl/*.json``.

    python -m benchmarks.plot_ppl            # writes results/ppl_vs_sparsity_SCOPE.png
    python -m benchmarks.update_readme       # puts the tables into the README

``table(profile, scope)`` is the README's table: one row per method, one column per pattern, wiki /
PTB perplexity per cell (``-`` for a run not done yet, ``nan`` for a run that produced non-finite values).
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.ppl_vs_sparsity import METHODS, PATTERNS, PPL, run_name

RESULTS = PPL.parent


def load_runs(profile: str, scope: str, folder: Path = PPL) -> dict[tuple[str, str], dict]:
    """Recorded runs by ``(method, pattern)``."""
    runs = {}
    for method in METHODS:
        for pattern in PATTERNS:
            path = folder / f"{run_name(profile, scope, method, pattern)}.json"
            if path.exists():
                runs[method, pattern] = json.loads(path.read_text())
    return runs


def _cell(run: dict | None, corpora: tuple[str, ...]) -> str:
    if run is None:
        return "-"
    if run["perplexity"] is None:
        return "nan"
    values = [run["perplexity"].get(c) for c in corpora]         # a run older than a corpus: "-"
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values)


def table(profile: str, scope: str, folder: Path = PPL) -> str:
    """Markdown table of wiki / PTB perplexity per method and pattern, with the dense row and sources."""
    runs = load_runs(profile, scope, folder)
    dense_path = folder / f"{profile}_dense.json"
    if not runs or not dense_path.exists():
        raise FileNotFoundError(f"no {profile} {scope} runs")
    dense = json.loads(dense_path.read_text())
    corpora = tuple(dense["perplexity"])
    lines = ["| method | " + " | ".join(PATTERNS) + " | prune time at 70 % (forward / solves) |",
             "|---|" + "---:|" * (len(PATTERNS) + 1)]
    lines.append("| dense | " + " | ".join([" / ".join(f"{dense['perplexity'][c]:.1f}" for c in corpora)] * len(PATTERNS)) + " | |")
    for method in METHODS:
        if not any((method, p) in runs for p in PATTERNS):
            continue
        timing = runs.get((method, "0.7"))
        seconds = timing["seconds"] if timing else None
        time_cell = f"{seconds['prune']:.0f} s ({seconds['forward']:.0f} / {seconds['solve']:.0f})" if seconds else "-"
        lines.append(f"| {method} | " + " | ".join(_cell(runs.get((method, p)), corpora) for p in PATTERNS) + f" | {time_cell} |")
    first = next(iter(runs.values()))["meta"]
    m = first["machine"]
    escalations = sum(r["escalations"] for r in runs.values())
    threads = "/".join(str(t) for t in sorted({r["meta"]["machine"]["torch_threads"] for r in runs.values()}))
    nonfinite = sum(bool(r["nonfinite"]) for r in runs.values())
    return ("\n".join(lines) + f"\n\n_Cells: {' / '.join(corpora)} perplexity. {len(runs)} runs; damping escalations "
            f"{escalations}; runs with non-finite values {nonfinite}. Source: `python -m benchmarks.ppl_vs_sparsity "
            f"--profile {profile} --scope {scope}`, commits {sorted({r['meta']['commit'][:12] for r in runs.values()})}; "
            f"{m['cpus']} CPUs, torch threads {threads}, torch {first['versions']['torch']}._\n")


def plot(profile: str, scope: str, folder: Path = PPL, out: Path = RESULTS) -> Path:
    """Perplexity (log scale) vs unstructured sparsity, one line per method, one panel per corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(profile, scope, folder)
    if not runs:
        raise FileNotFoundError(f"no {profile} {scope} runs")
    dense = json.loads((folder / f"{profile}_dense.json").read_text())["perplexity"]
    corpora = list(dense)
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for method in METHODS:
            points = [(float(p), runs[method, p]["perplexity"][corpus]) for p in PATTERNS
                      if ":" not in p and (method, p) in runs and corpus in (runs[method, p]["perplexity"] or {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=method, color=f"C{METHODS.index(method)}")
        ax.axhline(dense[corpus], color="gray", linestyle="--", label="dense")
        ax.set(yscale="log", xlabel="sparsity (unstructured, per row)", ylabel="perplexity",
               title=f"{corpus} ({profile}, {scope} model)")
        ax.legend()
    path = out / f"ppl_vs_sparsity_{profile}_{scope}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    """Plot every scope that has runs."""
    for scope in ("full", "first-half"):
        try:
            print(plot("p1", scope))
        except FileNotFoundError:
            print(f"no p1 {scope} runs yet")


if __name__ == "__main__":
    main()
