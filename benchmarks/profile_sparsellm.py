"""Where sparsellm's time goes on one SmolLM2 decoder layer, against sparsegpt on the same layer.

    python -m benchmarks.profile_sparsellm --nsamples 8 --iterations 4 --layer 1

Writes ``results/profile_sparsellm.json``: wall time of both methods on the layer and, for sparsellm,
the cumulative time of the coordinator's parts (cProfile), so speed work targets the right part.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from benchmarks.common import metadata, write_json

#: coordinator parts: (label, module file suffix, function name)
PARTS = [
    ("consistency refits", "coordinator.py", "_consistent_candidate"),
    ("gate / activation proximal updates", "coordinator.py", "update_preactivation"),
    ("activation ridge updates", "coordinator.py", "update_activation"),
    ("objective evaluations", "coordinator.py", "objective"),
    ("masked solves (all)", "sparsegpt.py", "sparsegpt"),
    ("cross-covariances", "coordinator.py", "cross"),
    ("one-shot start", "sequential.py", "layerwise"),
    ("dense auxiliaries", "coordinator.py", "__init__"),
]


def main() -> None:
    """Profile one layer and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--sparsity", default="0.7")
    parser.add_argument("--variants", default="local/all,local/downstream",
                        help="sparsellm variants PROX/CONSISTENCY to profile, comma-separated")
    args = parser.parse_args()

    from sparsesolve.data import calibration_windows, corpus_tokens
    from sparsesolve.decoder import prune_decoder
    from sparsesolve.models import load_model
    from sparsesolve.patterns import parse_pattern

    model, tokenizer = load_model("smollm2-135m")
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), args.nsamples, args.seq_len, 0)
    layers = f"{args.layer}:{args.layer + 1}"
    rows = {}
    for method in ["sparsegpt", *(f"sparsellm/{v}" for v in args.variants.split(","))]:
        model, _ = load_model("smollm2-135m")
        options = {}
        if "/" in method:
            _, prox, consistency = method.split("/")
            options = {"iterations": args.iterations, "prox": prox, "consistency": consistency}
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        result = prune_decoder(model, windows, parse_pattern(args.sparsity), method=method.split("/")[0], layers=layers,
                               sparsellm_options=options, progress=False)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        parts = {label: sum(v[3] for (file, _, name), v in stats.items() if file.endswith(suffix) and name == func)
                 for label, suffix, func in PARTS}
        rows[method] = {"seconds": time.perf_counter() - started, "forward": result.forward_seconds,
                        "solve": result.solve_seconds, "ffn": result.layers[-1]["ffn"],
                        "parts": parts if "/" in method else {}}
        print(method, f"{rows[method]['seconds']:.1f} s", flush=True)
    write_json("profile_sparsellm", {"meta": metadata("benchmarks.profile_sparsellm", 0), "settings": vars(args),
                                     "rows": rows})


if __name__ == "__main__":
    main()
