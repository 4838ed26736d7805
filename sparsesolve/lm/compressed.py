"""Reading sparsesolve's compressed model folders (the format ``sparsesolve.deploy.export`` writes).

``model.compressed.safetensors`` holds, per pruned linear, the kept values (or quantisation codes with
their grid) and the mask as a packed bitmask or as column indices; its metadata names the
format, each linear's encoding and the tied tensors. ``load_compressed`` rebuilds the dense weights
exactly as saved; loading lives here, below the deployment layer, so ``load_model`` can read such a
folder without importing the writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

__all__ = ["COMPRESSED_FILE", "FORMAT", "PACKED_PARTS", "load_compressed", "unpack"]

COMPRESSED_FILE = "model.compressed.safetensors"
FORMAT = "sparsesolve-compressed-2"
PACKED_PARTS = ("values", "bitmask", "row_counts", "columns", "codes", "scales", "offsets")


def unpack(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], encoding: str,
           quantization: tuple[int, int] | None = None) -> torch.Tensor:
    """The dense ``out x in`` weight from its packed tensors."""
    out_features, in_features = shape
    if encoding == "bitmask":
        bits = np.unpackbits(tensors[f"{name}.bitmask"].numpy(), axis=1, count=in_features)
        mask = torch.from_numpy(bits.astype(bool))
    else:
        rows = torch.repeat_interleave(torch.arange(out_features), tensors[f"{name}.row_counts"].long())
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[rows, tensors[f"{name}.columns"].long()] = True
    if quantization is None:
        values = tensors[f"{name}.values"]
    else:
        bits, groupsize = quantization
        codes = tensors[f"{name}.codes"]
        if bits <= 4:
            codes = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)
        rows, cols = mask.nonzero(as_tuple=True)
        codes, group = codes[: len(rows)].long(), cols // groupsize
        steps = (codes + tensors[f"{name}.offsets"][rows, group].long()).float()
        values = tensors[f"{name}.scales"][rows, group] * steps
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[mask] = values
    return weight


def load_compressed(folder: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model of a compressed folder, its weights exactly as stored (cast to ``dtype`` if given)."""
    path = Path(folder) / COMPRESSED_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (format {metadata.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    encodings, aliases = json.loads(metadata["encodings"]), json.loads(metadata["aliases"])
    packed = {f"{name}.{part}" for name in encodings for part in PACKED_PARTS}
    state = {k: v for k, v in tensors.items() if k not in packed}
    for name, info in encodings.items():
        quantization = None if info.get("quantization") is None else tuple(info["quantization"])
        weight = unpack(tensors, name, tuple(info["shape"]), info["encoding"], quantization)
        weight = weight.to(getattr(torch, info.get("dtype", str(weight.dtype).removeprefix("torch."))))
        state[f"{name}.weight"] = weight.T.contiguous() if info["transposed"] else weight
    for key, target in aliases.items():
        state[key] = state[target]
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype if dtype is None else dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in aliases]:
        raise ValueError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
