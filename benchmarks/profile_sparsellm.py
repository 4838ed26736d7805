"""Where sparsellm's time goes on one SmolLM2 decoder layer, and what each variant buys, against sparsegpt.

    python -m benchmarks.profile_sparsellm --nsamples 64 --layer 1 --out study_p1_layer1 \\
        --variant base iterations=4 --variant global iterations=4,prox=global

Each ``--variant NAME OPTIONS`` is a set of ``sparsellm`` options (``key=value`` pairs, comma-separated;
numbers and booleans parsed). Writes ``results/OUT.json``: wall time of sparsegpt and of every variant on
the layer, the FFN's relative reconstruction error after each coordinator iteration (so one run with
``iterations=4`` shows every shorter run too) with the seconds of each, and the cumulative time of the
coordinator's parts (cProfile), so speed work targets the right part.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from benchmarks.common import metadata, parse_options, write_json

#: coordinator parts: (label, module file suffix, function name)
PARTS = [
    ("consistency refits", "coordinator.py", "_consistent_candidate"),
    ("gate / activation proximal updates", "coordinator.py", "update_preactivation"),
    ("activation ridge updates", "coordinator.py", "update_activation"),
    ("masked solves (all)", "sparsegpt.py", "sparsegpt"),
    ("exact fixed-mask refits (all)", "refit.py", "refit"),
    ("cross-covariances", "coordinator.py", "cross"),
    ("one-shot start", "sequential.py", "layerwise"),
    ("dense auxiliaries", "coordinator.py", "__init__"),
]


def main() -> None:
    """Profile one layer under every variant and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--sparsity", default="0.7", help="pattern: 0.7, 2:4 ...")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OPTIONS"),
                        help="a sparsellm variant: NAME key=value,... (repeatable; default: base iterations=4)")
    parser.add_argument("--out", default="profile_sparsellm", help="results/OUT.json")
    args = parser.parse_args()
    variants = {name: parse_options(text) for name, text in (args.variant or [("base", "iterations=4")])}

    from sparsesolve.data import calibration_windows, corpus_tokens
    from sparsesolve.decoder import prune_decoder
    from sparsesolve.models import load_model
    from sparsesolve.patterns import parse_pattern

    model, tokenizer = load_model("smollm2-135m")
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), args.nsamples, args.seq_len, 0)
    layers = f"{args.layer}:{args.layer + 1}"
    rows = {}
    for name, options in {"sparsegpt": None, **variants}.items():
        model, _ = load_model("smollm2-135m")
        method = "sparsegpt" if options is None else "sparsellm"
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        result = prune_decoder(model, windows, parse_pattern(args.sparsity), method=method, layers=layers,
                               sparsellm_options=options, progress=False)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        parts = {label: sum(v[3] for (file, _, fn), v in stats.items() if file.endswith(suffix) and fn == func)
                 for label, suffix, func in PARTS}
        ffn = result.layers[-1]["ffn"]
        rows[name] = {"options": options, "seconds": time.perf_counter() - started, "forward": result.forward_seconds,
                      "solve": result.solve_seconds, "ffn": ffn, "parts": parts if options is not None else {}}
        print(f"{name}: {rows[name]['seconds']:.1f} s, FFN error {ffn['relative_error']:.5f} "
              f"(per iteration {[round(e, 5) for e in ffn.get('iteration_errors', [])]})", flush=True)
    write_json(args.out, {"meta": metadata("benchmarks.profile_sparsellm", 0), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
