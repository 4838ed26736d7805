"""AST retraining at 2:4: wiki validation perplexity against tokens seen, for three starts and two ablations.

    python -m benchmarks.bench_ast --tokens 200000                 # about an hour per run on 2 CPU cores
    python -m benchmarks.bench_ast --tokens 2000000 --device cuda  # when a GPU is lent

Runs (same budget, schedule and seed): ``magnitude`` (the paper's start: dense weights, magnitude
masks), ``sparsegpt`` and ``sparsellm`` (warm starts from their one-shot 2:4 models, the one-shot mask
held for the first ``--fixed-mask-steps``), each with distillation and SLoRB (k = 16); and the
ablations ``sparsegpt-no-kd``, ``sparsegpt-no-slorb`` and ``sparsegpt-gradient-decay`` (SR-STE's decay
form instead of the default Adam-update form). The one-shot models are pruned once with the
P1 calibration set into ``--work`` (not the repository). One JSON per run in ``results/ast/``
(skipped when present; an interrupted run resumes from its checkpoint), then the plot
``results/ast_ppl_vs_tokens.png``. Each JSON: the retraining log (validation perplexity at every
``--eval-every`` steps, from step 0), the final wiki / PTB test perplexity (P1 windows), the dense
and one-shot perplexities for the gap closed, the decay form and ``slorb_init_abs_mean`` (mean ``|S|``
of the SLoRB terms at step 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, metadata, write_json

AST = RESULTS / "ast"
RUNS = {  # name: (start, options)
    "magnitude": ("magnitude", {}),
    "sparsegpt": ("sparsegpt", {}),
    "sparsellm": ("sparsellm", {}),
    "sparsegpt-no-kd": ("sparsegpt", {"distill": False}),
    "sparsegpt-no-slorb": ("sparsegpt", {"slorb": 0}),
    "sparsegpt-gradient-decay": ("sparsegpt", {"decay": "gradient"}),
}


def one_shot(model_name: str, method: str, work: Path, nsamples: int, seq_len: int) -> Path:
    """The one-shot 2:4 model of ``method`` in ``WORK/oneshot-METHOD`` (pruned once, then reused)."""
    from sparsesolve.config import CalibrationConfig, EvaluationConfig, RunConfig
    from sparsesolve.core.config import PruneConfig
    from sparsesolve.pipeline import run_prune

    path = work / f"oneshot-{method}"
    if not path.exists():
        run_prune(RunConfig(model_name, PruneConfig("2:4", method=method), CalibrationConfig("wiki", nsamples, seq_len, seed=0),
                            EvaluationConfig(corpora=(), seq_len=seq_len), out=str(path)))
    return path


def test_perplexities(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, float]:
    """Wiki and PTB test perplexity on the first ``--eval-windows`` windows of ``--test-seq-len`` (P1: 64 x 512)."""
    from sparsesolve.lm.evaluate import perplexity

    return {c: perplexity(model, c, args.test_seq_len, args.eval_windows, tokenizer=tokenizer, progress=False)
            for c in ("wiki", "ptb")}


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One retraining run; its record."""
    from sparsesolve.lm.models import load_model
    from sparsesolve.retrain import RetrainConfig, retrain, sparse_student

    start, options = RUNS[name]
    options = dict(options)
    slorb = options.pop("slorb", 16)
    from_dir = None if start == "magnitude" else one_shot(args.model, start, args.work, args.nsamples, args.test_seq_len)
    teacher, tokenizer = load_model(args.model, device=args.device)
    student, _ = load_model(str(from_dir) if from_dir else args.model, device=args.device)
    layers = sparse_student(student, teacher, from_dir, slorb_k=slorb or None)
    scales = [layer.slorb.scale.detach().abs() for layer in layers.values() if layer.slorb is not None]
    slorb_init = float(sum(s.sum() for s in scales) / sum(s.numel() for s in scales)) if scales else None
    before = test_perplexities(student, tokenizer, args)
    config = RetrainConfig(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                           eval_every=args.eval_every, checkpoint_every=args.eval_every,
                           fixed_mask_steps=0 if from_dir is None else args.fixed_mask_steps, **options)
    out = args.work / f"ast-{name}"
    staging = out.with_name(out.name + ".partial")
    report = retrain(student, teacher, tokenizer, layers, config, out, resume=staging.exists(), overwrite=True)
    trained, _ = load_model(str(out), device=args.device)
    final = test_perplexities(trained, tokenizer, args)
    return {"name": name, "start": start, "slorb": slorb, "decay": report["config"]["decay"],
            "slorb_init_abs_mean": slorb_init, "config": report["config"], "log": report["log"],
            "seconds": report["seconds"], "slorb_parameters": report["slorb_parameters"],
            "parameters": report["parameters"], "perplexity": {"start": before, "final": final}}


def plot(folder: Path = AST, out: Path = RESULTS) -> Path:
    """Validation perplexity (log scale) against tokens seen, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem != "dense"]
    if not runs:
        raise FileNotFoundError(f"no runs in {folder}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        points = [(e["tokens"], e["wiki_validation_ppl"]) for e in r["log"] if "wiki_validation_ppl" in e]
        ax.plot(*zip(*points), marker="o", label=r["name"])
    dense = json.loads((folder / "dense.json").read_text())
    ax.axhline(dense["validation"], color="gray", linestyle="--", label="dense")
    ax.set(yscale="log", xlabel="tokens seen", ylabel="wiki validation perplexity", title="AST at 2:4")
    ax.legend()
    path = out / "ast_ppl_vs_tokens.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _validation(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(e["tokens"], e["wiki_validation_ppl"]) for e in run["log"] if "wiki_validation_ppl" in e]


def table(folder: Path = AST) -> str:
    """The README table: per run its start and final perplexities, the share of the start's gap to the
    dense model closed (wiki test) and whether its validation curve lies below the paper's start
    (``magnitude``) at every logged point, i.e. reaches every level with fewer tokens."""
    runs = {name: json.loads((folder / f"{name}.json").read_text()) for name in RUNS if (folder / f"{name}.json").exists()}
    if not (folder / "dense.json").exists() or not runs:
        raise FileNotFoundError(f"no runs in {folder}")
    dense = json.loads((folder / "dense.json").read_text())
    paper = dict(_validation(runs["magnitude"])) if "magnitude" in runs else {}
    lines = ["| run | start | decay | mean abs S at step 0 | tokens (steps) | wiki validation: step 0 -> end "
             "| wiki / PTB test: start -> end | wiki gap to dense closed | below the paper's start at every point | time |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, r in runs.items():
        curve = _validation(r)
        start, final = r["perplexity"]["start"], r["perplexity"]["final"]
        closed = (start["wiki"] - final["wiki"]) / (start["wiki"] - dense["wiki"])
        shared = [(t, v) for t, v in curve if t in paper]
        below = "-" if name == "magnitude" or not shared else \
            ("yes" if all(v < paper[t] for t, v in shared if t > 0) else "no")
        decay = r["config"].get("decay", "gradient")
        slorb_init = r.get("slorb_init_abs_mean")
        lines.append(f"| {name} | {r['start']}{'' if r['slorb'] else ', no SLoRB'}"
                     f"{'' if r['config']['distill'] else ', no KD'} | {decay} | "
                     + ("-" if slorb_init is None else f"{slorb_init:.2e}") + f" | {curve[-1][0]:,} ({r['log'][-1]['step']}) "
                     f"| {curve[0][1]:.1f} -> {curve[-1][1]:.1f} | {start['wiki']:.1f} / {start['ptb']:.1f} -> "
                     f"{final['wiki']:.1f} / {final['ptb']:.1f} | {closed:.0%} | {below} | {r['seconds']:.0f} s |")
    meta = dense["meta"]
    commits = ", ".join(f"`{c}`" for c in sorted({r["meta"]["commit"][:12] for r in [dense, *runs.values()]}))
    return "\n".join(lines) + (f"\n\n_Dense: wiki / PTB test {dense['wiki']:.2f} / {dense['ptb']:.2f}, wiki validation "
                               f"{dense['validation']:.2f}. Source: `{meta['command']}` at commits {commits}; "
                               f"{meta['machine']['cpus']} CPUs, {meta['machine']['torch_threads']} torch threads._\n")


def main() -> None:
    """Run every missing run, then plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--fixed-mask-steps", type=int, default=20, help="warm starts hold the one-shot mask this long")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows of the one-shot models")
    parser.add_argument("--eval-windows", type=int, default=64, help="test windows of the final perplexities")
    parser.add_argument("--test-seq-len", type=int, default=512, help="tokens per test and calibration window (P1: 512)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_ast"), help="one-shot and retrained models")
    parser.add_argument("--out", type=Path, default=AST, help="results folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.out / "dense.json").exists():
        from sparsesolve.lm.evaluate import perplexity
        from sparsesolve.lm.models import load_model

        model, tokenizer = load_model(args.model, device=args.device)
        validation = perplexity(model, "wiki", args.seq_len, 16, tokenizer=tokenizer, split="validation", progress=False)
        write_json("dense", {"meta": metadata("benchmarks.bench_ast", 0), **test_perplexities(model, tokenizer, args),
                             "validation": validation}, args.out)
    for name in names:
        if not (args.out / f"{name}.json").exists():
            write_json(name, {"meta": metadata("benchmarks.bench_ast", 0), **run(name, args)}, args.out)
    print(plot(args.out, args.out.parent))


if __name__ == "__main__":
    main()
