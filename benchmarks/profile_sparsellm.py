"""Where sparsellm's time goes on one SmolLM2 decoder layer, and what each variant buys, against sparsegpt.

    python -m benchmarks.profile_sparsellm --nsamples 64 --layer 1 --out study_p1_layer1 \\
        --variant base iterations=4 --variant global iterations=4,prox=global

Each ``--variant NAME OPTIONS`` is a set of ``sparsellm`` options (``key=value`` pairs, comma-separated;
numbers and booleans parsed); two keys are not coordinator options: ``solver=admm`` sets sparsellm's
per-layer solver (``PruneConfig.solver``), ``method=admm`` prunes with that per-layer method instead of
sparsellm (``--variant admm method=admm``). Writes ``results/OUT.json``: wall time of sparsegpt and of every variant on
the layer, the FFN's relative reconstruction error after each coordinator iteration (so one run with
``iterations=4`` shows every shorter run too) with the seconds of each, and the cumulative time of the
coordinator's parts (cProfile), so speed work targets the right part. With ``--heldout N`` it also
measures each pruned FFN's relative error ``||F(X) - F_hat(X)||^2 / ||F(X)||^2`` (``F`` the dense FFN,
``X`` its inputs in the pruned model) on the first ``N`` test windows of wiki and of PTB: whether the
error the coordinator removes on the calibration set is also removed on text it has not seen.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import time

import torch

from benchmarks.common import metadata, parse_options, write_json

#: coordinator parts: (label, module file suffix, function name)
PARTS = [
    ("coordinated pass solves (masked solve and refit)", "coordinator.py", "solve"),
    ("conjugate-gradient refits", "cg_refit.py", "cg_refit"),
    ("gate / activation proximal updates", "coordinator.py", "update_preactivation"),
    ("activation ridge updates", "coordinator.py", "update_activation"),
    ("masked solves (all)", "sparsegpt.py", "sparsegpt"),
    ("cross-covariances", "coordinator.py", "cross"),
    ("one-shot start", "sequential.py", "layerwise"),
    ("dense auxiliaries", "coordinator.py", "__init__"),
]


def heldout_ffn_error(model: torch.nn.Module, dense_ffn: torch.nn.Module, ffn: torch.nn.Module,
                      windows: torch.Tensor) -> float:
    """Relative error of the pruned ``ffn`` against ``dense_ffn`` on the inputs ``ffn`` receives when
    ``model`` runs ``windows`` (``n x seq_len`` token ids), accumulated in float64 over all tokens."""
    sums = torch.zeros(2, dtype=torch.float64)

    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        target = dense_ffn(inputs[0]).double()
        sums[0] += (target - output.double()).pow(2).sum()
        sums[1] += target.pow(2).sum()

    handle = ffn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None])
    finally:
        handle.remove()
    return float(sums[0] / sums[1])


def main() -> None:
    """Profile one layer under every variant and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--sparsity", default="0.7", help="pattern: 0.7, 2:4 ...")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OPTIONS"),
                        help="a sparsellm variant: NAME key=value,... (repeatable; default: base iterations=4)")
    parser.add_argument("--heldout", type=int, default=0,
                        help="also the FFN error on the first N test windows of wiki and PTB (default 0: off)")
    parser.add_argument("--out", default="profile_sparsellm", help="results/OUT.json")
    args = parser.parse_args()
    variants = {name: parse_options(text) for name, text in (args.variant or [("base", "iterations=4")])}

    from sparsesolve.core.config import PruneConfig, SparseLLMConfig
    from sparsesolve.lm.data import calibration_windows, corpus_tokens, eval_windows
    from sparsesolve.lm.decoder import prune_decoder
    from sparsesolve.lm.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), args.nsamples, args.seq_len, 0)
    layers = f"{args.layer}:{args.layer + 1}"
    heldout = {corpus: eval_windows(corpus_tokens(tokenizer, corpus, "test"), args.seq_len, args.heldout)
               for corpus in ("wiki", "ptb")} if args.heldout else {}
    dense_ffn = copy.deepcopy(model.model.layers[args.layer].mlp)
    rows = {}
    for name, options in {"sparsegpt": None, **variants}.items():
        model, _ = load_model("smollm2-135m")
        coordinated = dict(options or {})
        method = "sparsegpt" if options is None else coordinated.pop("method", "sparsellm")
        solver = coordinated.pop("solver", "sparsegpt")
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        coordinator = SparseLLMConfig.for_language_models(**coordinated) if method == "sparsellm" else None
        config = PruneConfig(args.sparsity, method=method, solver=solver, layers=layers, sparsellm=coordinator)
        result = prune_decoder(model, windows, config, progress=False)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        parts = {label: sum(v[3] for (file, _, fn), v in stats.items() if file.endswith(suffix) and fn == func)
                 for label, suffix, func in PARTS}
        ffn = result.layers[-1].to_dict()["ffn"]
        rows[name] = {"options": options, "seconds": time.perf_counter() - started, "forward": result.forward_seconds,
                      "solve": result.solve_seconds, "ffn": ffn, "parts": parts if method == "sparsellm" else {}}
        rows[name]["heldout_ffn_error"] = {
            corpus: heldout_ffn_error(model, dense_ffn, model.model.layers[args.layer].mlp, tokens)
            for corpus, tokens in heldout.items()}
        print(f"{name}: {rows[name]['seconds']:.1f} s, FFN error {ffn['relative_error']:.5f} "
              f"(per iteration {[round(e, 5) for e in ffn.get('iteration_errors', [])]}), "
              f"held out {rows[name]['heldout_ffn_error']}", flush=True)
    write_json(args.out, {"meta": metadata("benchmarks.profile_sparsellm", 0), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
