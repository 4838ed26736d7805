"""Over-fitting with few calibration tokens: SmolLM2, layer 0 only, sparsegpt vs sparsellm.

    python -m benchmarks.bench_calibration_size

For each calibration size (windows x 256 tokens, wiki train, seed 0) prunes only decoder layer 0 at
50 % and records the FFN's calibration reconstruction error and the wiki test perplexity on the
first 4 windows of 256 tokens; sparsellm with both proximal updates (global, local). Writes ``results/calibration_size.json``.
"""

from __future__ import annotations

import copy

from benchmarks.common import metadata, write_json

SEQ_LEN = 256
SIZES = (4, 16)


def main() -> None:
    """Run every (size, method) pair and write the JSON."""
    from sparsesolve.core.config import PruneConfig, SparseLLMConfig
    from sparsesolve.lm.data import calibration_windows, corpus_tokens
    from sparsesolve.lm.decoder import prune_decoder
    from sparsesolve.lm.evaluate import perplexity
    from sparsesolve.lm.models import load_model

    dense, tokenizer = load_model("smollm2-135m")
    test = corpus_tokens(tokenizer, "wiki", "test")
    train = corpus_tokens(tokenizer, "wiki", "train")
    rows = [{"windows": 0, "method": "dense", "perplexity": perplexity(dense, test, SEQ_LEN, 4, progress=False)}]
    for windows in SIZES:
        calibration = calibration_windows(train, windows, SEQ_LEN, seed=0)
        for method, options in (("sparsegpt", {}), ("sparsellm", {"prox": "global"}), ("sparsellm", {"prox": "local"})):
            model = copy.deepcopy(dense)
            coordinator = SparseLLMConfig.for_language_models(**options) if method == "sparsellm" else None
            result = prune_decoder(model, calibration, PruneConfig("0.5", method=method, layers=[0], sparsellm=coordinator),
                                   progress=False)
            rows.append({"windows": windows, "tokens": windows * SEQ_LEN, "method": method, **options,
                         "ffn_relative_error": result.layers[0].ffn.relative_error,
                         "perplexity": perplexity(model, test, SEQ_LEN, 4, progress=False)})
            print(rows[-1], flush=True)
    write_json("calibration_size", {"meta": metadata("benchmarks.bench_calibration_size", 0), "rows": rows})


if __name__ == "__main__":
    main()
