"""The SparseLLM study's tables for benchmarks/README.md, from the results JSON (never edited by hand).

    python -m benchmarks.update_readme     # fills these and the README's tables

- ``variant_table``: every ``results/study_*.json`` (``profile_sparsellm`` runs on one decoder layer):
  seconds and the FFN's relative reconstruction error after each coordinator iteration, per variant.
- ``goals_table``: sparsellm against sparsegpt on the P1 grid, pattern by pattern (perplexity change,
  prune-time ratio), with the study runs (``--tag``) alongside.
- ``heldout_table``: the layer studies run with ``--heldout``: FFN error of sparsegpt -> sparsellm on the
  calibration set and on held-out wiki and PTB text: whether the coordinator's gain carries over.
- ``layer_table``: the FFN error of every decoder layer in the sparsellm runs, its sparsegpt start
  (on the same inputs) -> the coordinator's result: which layers gain and which do not.
- ``allocation_table``: the P1 runs with a layer-wise sparsity allocation (``--allocation``) against the
  uniform run of the same method and pattern, on every test corpus the runs share.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.ppl_vs_sparsity import PATTERNS, PPL, run_name


def _threads(meta: dict) -> str:
    m = meta["machine"]
    load = m.get("load_average_1m")
    return f"{m['torch_threads']} thr" + (f", load {load:.1f}" if load is not None else "")


def variant_table(folder: Path = RESULTS) -> str:
    """One row per variant of every layer study: options, seconds (ratio to sparsegpt), error per iteration."""
    studies = sorted(folder.glob("study_*.json"))
    if not studies:
        raise FileNotFoundError("study_*.json")
    lines = ["| layer, pattern, calibration | variant | options | seconds (forward) | solves x sparsegpt "
             "| FFN error: start -> after each iteration |", "|---|---|---|---:|---:|---|"]
    commands = []
    for path in studies:
        data = json.loads(path.read_text())
        s, rows = data["settings"], data["rows"]
        where = f"{s['layer']}, {s['sparsity']}, {s['nsamples']} x {s['seq_len']}"
        base = rows["sparsegpt"]["solve"]
        for name, row in rows.items():
            ffn = row["ffn"]
            errors = " -> ".join(f"{e:.4f}" for e in [ffn["start_relative_error"], *ffn.get("iteration_errors", [])])
            options = ", ".join(f"{k}={v}" for k, v in (row["options"] or {}).items()) or "-"
            lines.append(f"| {where} | {name} | {options} | {row['seconds']:.1f} ({row['forward']:.1f}) "
                         f"| {row['solve'] / base:.1f}x | {errors} |")
        commands.append(f"`{data['meta']['command']}` ({path.name}, commit `{data['meta']['commit'][:12]}`, "
                        f"{_threads(data['meta'])})")
    return "\n".join(lines) + "\n\n_Sources: " + "; ".join(commands) + "._\n"


def heldout_table(folder: Path = RESULTS) -> str:
    """Per layer study with held-out errors: sparsegpt -> each sparsellm variant on calibration, wiki, PTB."""
    studies = [json.loads(p.read_text()) for p in sorted(folder.glob("study_*.json"))]
    studies = [d for d in studies if d["rows"]["sparsegpt"].get("heldout_ffn_error")]
    if not studies:
        raise FileNotFoundError("study_*.json with held-out errors")
    lines = ["| layer | pattern | variant | calibration | held-out wiki | held-out PTB | split's held-out windows |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for data in sorted(studies, key=lambda d: (d["settings"]["layer"], d["settings"]["sparsity"], d["settings"].get("out", ""))):
        s, ref = data["settings"], data["rows"]["sparsegpt"]
        before = {"calibration": ref["ffn"]["relative_error"], **ref["heldout_ffn_error"]}
        split = {name: row["ffn"]["heldout_relative_error"] for name, row in data["rows"].items()
                 if row["ffn"].get("heldout_relative_error") is not None}
        picked = min(split, key=split.get) if len(split) > 1 else None
        for name, row in data["rows"].items():
            if name == "sparsegpt":
                continue
            after = {"calibration": row["ffn"]["relative_error"], **row["heldout_ffn_error"]}
            cells = [f"{before[k]:.4f} -> {after[k]:.4f} ({after[k] / before[k] - 1:+.0%})"
                     for k in ("calibration", "wiki", "ptb")]
            own = "-" if name not in split else f"{split[name]:.4f}" + (" (its choice)" if name == picked else "")
            lines.append(f"| {s['layer']} | {s['sparsity']} | {name} | " + " | ".join(cells) + f" | {own} |")
    return "\n".join(lines) + "\n"


def _runs(profile: str, scope: str, method: str, folder: Path) -> dict[str, dict]:
    """Runs of ``method`` by file stem suffix (pattern, or pattern_tag for study runs)."""
    prefix = run_name(profile, scope, method, "")
    return {p.stem[len(prefix):]: json.loads(p.read_text()) for p in sorted(folder.glob(f"{prefix}*.json"))}


def _reference_run(key: str, run: dict, theirs: dict[str, dict]) -> dict | None:
    """The sparsegpt run a sparsellm run (file suffix ``key``) is compared with: the one with the same
    suffix when there is one, else the plainest one of the same pattern calibrated on the same corpora."""
    if key in theirs:
        return theirs[key]
    calib = run["calibration"].get("calib")
    same = [k for k, r in theirs.items() if k.split("_")[0] == key.split("_")[0] and r["calibration"].get("calib") == calib]
    return theirs[min(same, key=len)] if same else None


def goals_table(profile: str = "p1", scope: str = "full", folder: Path = PPL) -> str:
    """sparsellm vs sparsegpt per pattern: perplexity per corpus, change, prune seconds and peak resident
    memory of the pruning, with their ratios."""
    ours, theirs = _runs(profile, scope, "sparsellm", folder), _runs(profile, scope, "sparsegpt", folder)
    ours = {k: r for k, r in ours.items() if r.get("allocation", "uniform") == "uniform"}   # allocation_table's
    if not ours:
        raise FileNotFoundError(f"no {profile} {scope} sparsellm runs")
    lines = ["| pattern (run) | sparsegpt wiki / PTB [/ code] | sparsellm wiki / PTB [/ code] | change "
             "| prune s: sparsegpt / sparsellm (ratio) | peak MB: sparsegpt / sparsellm (ratio) |",
             "|---|---:|---:|---:|---:|---:|"]
    order = {run_name("", "", "", p).strip("_"): i for i, p in enumerate(PATTERNS)}
    for key in sorted(ours, key=lambda k: (order.get(k.split("_")[0], 99), k)):
        run, ref = ours[key], _reference_run(key, ours[key], theirs)
        if ref is None or run["perplexity"] is None or ref["perplexity"] is None:
            continue
        corpora = [c for c in ref["perplexity"] if c in run["perplexity"]]
        ppl = lambda r: " / ".join(f"{r['perplexity'][c]:.1f}" for c in corpora)  # noqa: E731
        change = " / ".join(f"{run['perplexity'][c] / ref['perplexity'][c] - 1:+.0%}" for c in corpora)
        a, b = ref["seconds"]["prune"], run["seconds"]["prune"]
        same = ref["meta"]["machine"]["torch_threads"] == run["meta"]["machine"]["torch_threads"]
        ratio = f"{b / a:.1f}x" if same else "threads differ"
        peaks = [r.get("peak_memory_mb", {}).get("prune") for r in (ref, run)]
        memory = f"{peaks[0]:.0f} / {peaks[1]:.0f} ({peaks[1] / peaks[0]:.2f}x)" if all(peaks) else "-"
        lines.append(f"| {run['pattern']} ({key}) | {ppl(ref)} | {ppl(run)} | {change} | {a:.0f} ({_threads(ref['meta'])}) / "
                     f"{b:.0f} ({_threads(run['meta'])}) ({ratio}) | {memory} |")
    options = sorted({json.dumps(r.get("sparsellm_options")) for r in ours.values()})
    return "\n".join(lines) + f"\n\n_sparsellm options of these runs: {', '.join(options)}._\n"


def layer_table(profile: str = "p1", scope: str = "full", folder: Path = PPL) -> str:
    """Per decoder layer and sparsellm run: FFN relative error of the sparsegpt start -> sparsellm."""
    ours = {k: r for k, r in _runs(profile, scope, "sparsellm", folder).items() if r.get("ffn_relative_error")}
    if not ours:
        raise FileNotFoundError(f"no {profile} {scope} sparsellm runs")
    keys = list(ours)
    layers = sorted({int(layer) for r in ours.values() for layer in r["ffn_relative_error"]})
    lines = ["| layer | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for layer in layers:
        cells = []
        for key in keys:
            ffn = ours[key]["ffn_relative_error"].get(str(layer))
            cells.append("" if ffn is None else f"{ffn['start_relative_error']:.3f} -> {ffn['relative_error']:.3f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _against_base(profile: str, scope: str, folder: Path, suffixes: tuple[str, ...]) -> tuple[list[tuple], list[str]]:
    """Per method and pattern that has a run with one of ``suffixes`` (``owl``, ``layermask``, ...): the
    rows ``(method, pattern, name, run, base)``, the plain run first (name ``""``) then each variant, and
    the corpora every listed run was scored on. Runs without perplexities are left out."""
    rows, shared = [], None
    for method in ("sparsegpt", "sparsellm"):
        runs = _runs(profile, scope, method, folder)
        for pattern in PATTERNS:
            key = run_name("", "", "", pattern).strip("_")
            base = runs.get(key)
            variants = [(name, runs[f"{key}_{name}"]) for name in suffixes if f"{key}_{name}" in runs]
            if base is None or not variants or base["perplexity"] is None:
                continue
            # a variant is compared with the plain run of its own ridge (sparsellm's default changed
            # between runs; the earlier plain runs are kept with the suffix ``ridgenone``)
            bases = [("", base)] + [(k[len(key) + 1:], r) for k, r in runs.items()
                                    if k.startswith(f"{key}_ridge") and r["perplexity"] is not None]
            paired = [(name, run, next((b for _, b in bases if _ridge(b) == _ridge(run)), base)) for name, run in variants]
            used = [(name, b, b) for name, b in bases if any(p[2] is b for p in paired)] or [("", base, base)]
            for name, run, own in [*used, *paired]:
                if run["perplexity"] is None:
                    continue
                corpora = [c for c in own["perplexity"] if c in run["perplexity"]]
                shared = corpora if shared is None else [c for c in shared if c in corpora]
                rows.append((method, pattern, name, run, own))
    return rows, shared or []


def _ridge(run: dict) -> float | None:
    """The ridge a sparsellm run used at its target sparsity (None for none, and for every other method):
    ``ridge``, unless the pattern is at or above the run's ``ridge_below``."""
    from sparsesolve.core.config import SparseLLMConfig
    from sparsesolve.core.patterns import parse_pattern

    options = run.get("sparsellm_options")
    return None if not options else SparseLLMConfig(**options).ridge_at(parse_pattern(run["pattern"]).sparsity)


def _perplexity_cells(run: dict, base: dict, corpora: list[str]) -> tuple[str, str]:
    """``run``'s perplexities over ``corpora`` and their change against ``base`` ("-" for the base itself)."""
    ppl = " / ".join(f"{run['perplexity'][c]:.1f}" for c in corpora)
    change = "-" if run is base else " / ".join(f"{run['perplexity'][c] / base['perplexity'][c] - 1:+.0%}" for c in corpora)
    return ppl, change


def allocation_table(profile: str = "p1", scope: str = "full", folder: Path = PPL) -> str:
    """Per method and unstructured pattern with an allocation run: perplexity per corpus under each
    allocation (``_rangeR`` runs: another ``allocation_range``; ``-linear`` runs: a sparsity per linear;
    ``_ffnF`` runs: the FFN curves scaled by ``F``), the change against uniform and the layers' sparsity range."""
    from sparsesolve.core.config import ALLOCATIONS

    kinds = tuple(f"{a}{unit}" for a in ALLOCATIONS if a != "uniform" for unit in ("", "-linear"))
    variant = rf"_((?:{'|'.join(kinds)})(?:_range[0-9.]+)?(?:_ffn[0-9.]+)?)\.json$"
    varied = sorted({match.group(1) for path in folder.glob(f"{profile}_{scope}_*.json")
                     if (match := re.search(variant, path.name)) and match.group(1) not in kinds})
    rows, shared = _against_base(profile, scope, folder, kinds + tuple(varied))
    if not rows:
        raise FileNotFoundError(f"no {profile} {scope} runs with an allocation")
    out = [f"| method | pattern | allocation | layer sparsity min-max | perplexity ({' / '.join(shared)}) | change vs uniform |",
           "|---|---|---|---|---:|---:|"]
    for method, pattern, name, run, base in rows:
        spread = run["layer_sparsity"].values()
        ppl, change = _perplexity_cells(run, base, shared)
        label = (f"uniform ({name})" if name else "uniform") if run is base else name
        out.append(f"| {method} | {pattern} | {label} | {min(spread):.3f}-{max(spread):.3f} | {ppl} | {change} |")
    return "\n".join(out) + "\n"


def selection_table(profile: str = "p1", scope: str = "full", folder: Path = PPL) -> str:
    """Per method and pattern with a mask-selection variant run (``_layermask``, ``_densepass``): the
    perplexity per corpus of each variant and its change against the default (per-row sparsity, true
    sequence inside the layer), with the prune seconds."""
    rows, shared = _against_base(profile, scope, folder, ("layermask", "densepass", "layermask_densepass"))
    if not rows or not shared:
        raise FileNotFoundError(f"no {profile} {scope} runs with a mask-selection variant")
    out = [f"| method | pattern | masks counted per | linears fitted on | perplexity ({' / '.join(shared)}) "
           "| change vs default | prune s |", "|---|---|---|---|---:|---:|---:|"]
    for method, pattern, _, run, base in rows:
        ppl, change = _perplexity_cells(run, base, shared)
        where = "layer" if run.get("mask_scope", "row") == "layer" else "row"
        fitted = "pruned predecessors" if run.get("true_sequential", True) else "dense layer pass"
        out.append(f"| {method} | {pattern} | {where} | {fitted} | {ppl} | {change} | "
                   f"{run['seconds']['prune']:.0f} ({_threads(run['meta'])}) |")
    return "\n".join(out) + "\n"
