"""2:4 semi-structured kernels against dense: linear layers and the whole model, batch sizes 1 to 4096 (CUDA).

    python -m benchmarks.bench_semistructured            # on a GPU; on a CPU it says so and exits 2

Linear layers: SmolLM2's shapes (576 x 576, 1536 x 576, 576 x 1536) and Llama-7B's (4096 x 4096,
11008 x 4096, 4096 x 11008), float16, a 2:4 magnitude mask; ``x W^T`` for ``tokens`` rows, median of
CUDA-event timings after warm-up, dense against ``to_sparse_semi_structured``. Whole model: SmolLM2 at
2:4 (magnitude) forward passes of ``batch x 128`` tokens, dense weights against every eligible linear
converted. Writes ``results/semistructured_speed.json`` with the GPU's name; a speed-up is what it
records, nothing more.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.common import metadata, write_json

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 16, 64, 256, 1024, 4096]


def _time(fn, repeats: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the GPU (CUDA events), after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def linear_rows(backend: str) -> list[dict]:
    """Dense vs 2:4 milliseconds per (shape, tokens)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from sparsesolve.core.patterns import NM

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    rows = []
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
        w = w * NM(2, 4).project(w.abs().float()).to(w.dtype)
        sparse = to_sparse_semi_structured(w)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
            dense_ms = _time(lambda: torch.nn.functional.linear(x, w))
            sparse_ms = _time(lambda: torch.nn.functional.linear(x, sparse))
            rows.append({"shape": [out_features, in_features], "tokens": tokens, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms})
            print(f"{out_features}x{in_features} tokens {tokens:5d}: dense {dense_ms:.3f} ms, 2:4 {sparse_ms:.3f} ms",
                  flush=True)
    return rows


def model_rows(backend: str) -> list[dict]:
    """Whole SmolLM2 forward at 2:4 (magnitude), dense weights vs converted, per batch of 128-token windows."""
    from sparsesolve import prune
    from sparsesolve.deploy.semistructured import to_semi_structured
    from sparsesolve.lm.data import calibration_windows, corpus_tokens
    from sparsesolve.lm.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    prune(model, calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), 1, 128), method="magnitude",
          pattern="2:4", progress=False)
    model = model.half().cuda()
    rows = []
    batches = [1, 8, 32]
    inputs = {b: torch.randint(0, model.config.vocab_size, (b, 128), device="cuda") for b in batches}
    with torch.no_grad():
        dense = {b: _time(lambda b=b: model(inputs[b]), repeats=10) for b in batches}
        report = to_semi_structured(model, torch.float16, backend)
        for b in batches:
            sparse_ms = _time(lambda b=b: model(inputs[b]), repeats=10)
            rows.append({"batch": b, "tokens": 128 * b, "dense_ms": dense[b], "sparse_ms": sparse_ms,
                         "speedup": dense[b] / sparse_ms, "converted_linears": len(report["eligible"])})
            print(f"model batch {b}: dense {dense[b]:.2f} ms, 2:4 {sparse_ms:.2f} ms", flush=True)
    return rows


def main() -> None:
    """Measure on the GPU and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["cutlass", "cusparselt"], default="cutlass")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_semistructured: the 2:4 kernels need a CUDA GPU; nothing measured", file=sys.stderr)
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    write_json("semistructured_speed", {"meta": metadata("benchmarks.bench_semistructured", 0),
                                        "gpu": torch.cuda.get_device_name(0), "backend": args.backend,
                                        "linear": linear_rows(args.backend), "model": model_rows(args.backend)})


if __name__ == "__main__":
    main()
