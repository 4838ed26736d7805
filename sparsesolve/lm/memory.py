"""How much memory ``prune_decoder`` needs per rank: a model of the arrays it holds.

Notation: ``N`` calibration tokens over ``K`` ranks (``n = ceil(N / K)`` per rank), model width ``d``,
FFN width ``f`` with ``g`` input branches (2 for a gated FFN: gate and up; 1 otherwise), ``s`` bytes
per stored activation (the storage dtype), ``a`` per stored auxiliary of sparsellm (2 when ``s = 4``:
the language-model default ``aux_dtype="bfloat16"``; else ``s``), ``c = 4`` bytes per computed value (float32 solves),
``C`` tokens per chunk (``chunk_size``), ``P`` parameters of one decoder layer stored in ``b`` bytes.

The layer being pruned (on the device with ``device=``; the rest of the model stays where it was
loaded) holds, at the peak, which is the FFN step:

- ``hidden``: the decoder layer's inputs, ``n d s``; ``ffn_inputs``: the FFN's inputs, ``n d s``.
- ``workspace``: the FFN's ``N``-sized arrays: a layer-wise method ``n f s`` (its activation) plus
  ``n d c`` (the dense target; candidates' outputs are compared with it chunk by chunk, never stored);
  sparsellm ``k n f a`` plus the target, ``k`` of its auxiliaries (``g`` pre-activations and the
  activation, whose storage the sequential passes reuse for their own activation) alive at its peak
  phase (below).
- ``chunks``: per-chunk temporaries: ``3 C f c`` of a pass's forward products and activation; sparsellm's
  elementwise updates hold ``12 B c`` (``UPDATE_TEMPORARIES``) in chunks of ``B = min(C f,
  UPDATE_BLOCK)`` values (``UPDATE_BLOCK_DEVICE`` off the CPU), so it takes the larger of the two.
- ``statistics``: the Grams and the solver's factors of the widest linear, ``S = 3 f^2 c + 3 d f c``;
  ``S0 = 3 d^2 c + 3 d f c`` while the linears reading the FFN's input are solved.
- ``candidates``: sparsellm only: the one-shot start's weights of the FFN's ``g + 1`` linears,
  ``W0 = (g + 1) d f b`` (in the model's dtype), kept as a candidate from the start on, and during
  the pass the conjugate-gradient refit's five ``m x n`` arrays, ``R = 5 d f c`` (a one-off CUDA
  allocation trace of the 7B-shaped run found them at the peak).
- ``layer``: the layer's weights, ``P b``.

sparsellm's peak is the largest of its phases, for the language-model defaults (``coordinator``
module docstring: the dense pre-activations are kept from the dense forward or, off the CPU or with
``preactivations="recompute"``, computed again; the last iteration updates the auxiliaries in one
sweep that stores none of them, keeping only the cross-covariances of gate and up, ``Q = g d f c``;
the last pass allocates its activation when it reaches the output linear), in ``A = n f a`` units of
auxiliary:

- the one-shot start: the lent activation and the kept pre-activations, ``(1 + g) A`` (``A`` when
  they are computed again), with ``S``;
- the last iteration's sweep: the kept pre-activations, ``g A`` (none when computed again), with
  ``3 Q + 2 d f c`` (the sums in float32 and float64; the output linear's weight and the activation
  update's coupling) and ``W0`` (when the pre-activations are computed again and the model is not
  stored in float32, also ``g d f c``: the dense weights of gate and up in float32);
- the last pass, solving gate and up: no auxiliary, ``S0 + Q``, ``W0 + R``;
- the last pass, solving the output linear: ``A`` (its activation) with ``S``, ``W0 + R``;
- with more than one iteration, the passes before the last keep every auxiliary: ``(g + 1) A`` with
  ``S``, ``2 W0 + R`` (the start and the best candidate so far).

Each term reports its value in that phase.

Everything but ``statistics``, ``candidates``, ``chunks`` and ``layer`` divides by ``K`` under token
sharding (for sparsellm, while the same phase stays the peak). The
model itself (host memory, one copy per rank process) is reported as ``model``, outside ``total``.
``benchmarks/bench_distributed.py`` checks the model against measured resident memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sparsesolve.core.config import DEFAULT_CHUNK, UPDATE_BLOCK, UPDATE_BLOCK_DEVICE, SparseLLMConfig
from sparsesolve.core.coordinator import recompute_preactivations

__all__ = ["pruning_memory", "pruning_memory_of"]

_COMPUTE = 4
#: chunk-sized float32 arrays alive at the peak of sparsellm's elementwise updates: 11.2 (stored) and 10.5
#: (the sweep) measured as resident memory around one chunk of 2^22 values of a gated FFN (a one-off
#: measurement), rounded up
UPDATE_TEMPORARIES = 12
#: a storage dtype's name by its bytes per value (2: the language-model default half type), and back
_NAMES = {2: "bfloat16", 4: "float32", 8: "float64"}
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def pruning_memory(*, tokens: int, d_model: int, d_ff: int, layer_params: int, model_params: int, ranks: int = 1,
                   storage_bytes: int = 2, param_bytes: int = 2, gated: bool = True, method: str = "sparsellm",
                   chunk_size: int | None = DEFAULT_CHUNK, device: str = "cpu",
                   aux_bytes: int | None = None, iterations: int | None = None,
                   preactivations: str = "auto") -> dict[str, float]:
    """Bytes per rank by term (module docstring) and their ``total``; ``model`` is the whole model's
    parameters in ``param_bytes`` (held once per rank process, not in ``total``); ``device``: the
    device type the layer is pruned on (it sets sparsellm's update chunks and phases); ``aux_bytes``:
    bytes per stored auxiliary (None: the language-model default, module docstring); ``iterations``:
    sparsellm's (None: the language-model default, one); ``preactivations``: sparsellm's
    ``SparseLLMConfig.preactivations`` (``"auto"``: recomputed off the CPU)."""
    n, d, f, s, c = math.ceil(tokens / ranks), d_model, d_ff, storage_bytes, _COMPUTE
    a = aux_bytes or _BYTES.get(SparseLLMConfig.for_language_models().aux_storage(_NAMES.get(s, "")), s)
    g = 2 if gated else 1
    chunk = min(n, chunk_size or n)
    block = UPDATE_BLOCK if device == "cpu" else UPDATE_BLOCK_DEVICE
    coordinated = method == "sparsellm"
    full, first = 3 * f * f * c + 3 * d * f * c, 3 * d * d * c + 3 * d * f * c
    start, refit = (g + 1) * d * f * param_bytes, 5 * d * f * c
    if coordinated:
        kept = 0 if recompute_preactivations(device, preactivations) else g    # pre-activations kept through the start
        recompute = 0 if kept or param_bytes == c else g * d * f * c
        crosses = g * d * f * c
        sweep = recompute + 3 * crosses + 2 * d * f * c       # sums in float32 and float64; the coupling's W, B
        phases = [(1 + kept, full, 0),                          # the one-shot start
                  (kept, sweep, start),                         # the last iteration's sweep
                  (0, first + crosses, start + refit),          # the last pass, gate and up
                  (1, full, start + refit)]                     # the last pass, the output linear
        if (SparseLLMConfig.for_language_models().iterations if iterations is None else iterations) > 1:
            phases.append((g + 1, full, 2 * start + refit))
        arrays, statistics, candidates = max(phases, key=lambda p: p[0] * n * f * a + p[1] + p[2])
        workspace = arrays * n * f * a
    else:
        workspace, statistics, candidates = n * f * s, full, 0
    terms = {
        "hidden": n * d * s,
        "ffn_inputs": n * d * s,
        "workspace": workspace + n * d * c,
        "chunks": max(UPDATE_TEMPORARIES * min(chunk * f, block) if coordinated else 0, 3 * chunk * f) * c,
        "statistics": statistics,
        "candidates": candidates,
        "layer": layer_params * param_bytes,
    }
    return {**{k: float(v) for k, v in terms.items()}, "total": float(sum(terms.values())),
            "model": float(model_params * param_bytes)}


def pruning_memory_of(folder: str | Path, *, tokens: int, ranks: int = 1, method: str = "sparsellm",
                      storage_bytes: int | None = None, chunk_size: int | None = DEFAULT_CHUNK,
                      device: str = "cpu", aux_bytes: int | None = None,
                      iterations: int | None = None, preactivations: str = "auto") -> dict[str, float]:
    """``pruning_memory`` for the model in ``folder`` (its ``config.json``; parameters counted from its
    safetensors), stored in its own dtype unless ``storage_bytes`` is given."""
    from safetensors import safe_open

    config = json.loads((Path(folder) / "config.json").read_text())
    text = config.get("text_config", config)
    sizes: dict[str, int] = {}
    dtype_bytes = 4
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as tensors:
            for key in tensors.keys():
                piece = tensors.get_slice(key)
                sizes[key] = math.prod(piece.get_shape())
                dtype_bytes = {"F32": 4, "F16": 2, "BF16": 2}.get(piece.get_dtype(), dtype_bytes)
    layer_params = sum(v for k, v in sizes.items() if ".layers.0." in k)
    d_ff = text.get("intermediate_size") or text.get("ffn_dim") or text.get("n_inner") or 4 * text["hidden_size"]
    gated = any("gate_proj" in key for key in sizes)
    return pruning_memory(tokens=tokens, d_model=text["hidden_size"], d_ff=d_ff, layer_params=layer_params,
                          model_params=sum(sizes.values()), ranks=ranks, storage_bytes=storage_bytes or dtype_bytes,
                          param_bytes=dtype_bytes, gated=gated, method=method, chunk_size=chunk_size, device=device,
                          aux_bytes=aux_bytes, iterations=iterations, preactivations=preactivations)
