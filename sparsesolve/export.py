"""Compressed export of a pruned model: kept values plus a packed bitmask, or column indices where smaller.

For every pruned linear (``masks.safetensors`` of a ``sparsesolve prune`` or ``retrain`` folder) the
``out x in`` weight ``W`` with keep-mask ``M`` is stored as

- ``NAME.values``: ``W[M]`` in row-major order (``k`` values, the model's dtype or ``dtype``), and
- ``bitmask``: ``NAME.bitmask``, ``M`` packed 8 inputs per byte (``out x ceil(in / 8)`` uint8), or
- ``indices``: ``NAME.row_counts`` (kept entries per row) and ``NAME.columns`` (their input indices),
  both int16 when ``in <= 32767`` (else int32), CSR without the prefix sum,

whichever takes fewer bytes (the bitmask costs ``in / 8`` bytes per row, indices ``2 (1 + k_row)``:
indices win below about 1/16 density). Every other tensor is stored as is; tied tensors once. The result is one
``model.compressed.safetensors`` next to the config and tokenizer, and ``compression.json`` with the
sizes; ``load_model`` reads it back to exactly the saved weights (bit for bit in the stored dtype).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from sparsesolve.output import OutputFolder

__all__ = ["COMPRESSED_FILE", "export_compressed", "load_compressed", "pack", "unpack"]

COMPRESSED_FILE = "model.compressed.safetensors"
FORMAT = "sparsesolve-compressed-1"
PACKED_PARTS = ("values", "bitmask", "row_counts", "columns")


def pack(weight: torch.Tensor, mask: torch.Tensor, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of one pruned ``out x in`` weight and the encoding chosen (module docstring)."""
    if weight.shape != mask.shape:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match the weight {tuple(weight.shape)}")
    if (weight[~mask] != 0).any():
        raise ValueError(f"{name} has non-zero weights outside its mask: export a pruned (projected) model")
    out_features, in_features = mask.shape
    values = weight[mask].contiguous()
    bitmask_bytes = out_features * ((in_features + 7) // 8)
    index_dtype = torch.int16 if in_features <= 32767 else torch.int32
    index_bytes = (out_features + int(mask.sum())) * (2 if index_dtype == torch.int16 else 4)
    if bitmask_bytes <= index_bytes:
        packed = torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=1))
        return {f"{name}.values": values, f"{name}.bitmask": packed}, "bitmask"
    columns = mask.nonzero()[:, 1].to(index_dtype)
    return {f"{name}.values": values, f"{name}.row_counts": mask.sum(dim=1).to(index_dtype),
            f"{name}.columns": columns}, "indices"


def unpack(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], encoding: str) -> torch.Tensor:
    """The dense ``out x in`` weight from its packed tensors."""
    out_features, in_features = shape
    if encoding == "bitmask":
        bits = np.unpackbits(tensors[f"{name}.bitmask"].numpy(), axis=1, count=in_features)
        mask = torch.from_numpy(bits.astype(bool))
    else:
        rows = torch.repeat_interleave(torch.arange(out_features), tensors[f"{name}.row_counts"].long())
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[rows, tensors[f"{name}.columns"].long()] = True
    values = tensors[f"{name}.values"]
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[mask] = values
    return weight


def _linear_modules(model: PreTrainedModel, names: list[str]) -> dict[str, bool]:
    """Whether each named module stores its weight transposed (GPT-2's Conv1D: ``in x out``)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the model has no module {missing[0]!r} named in masks.safetensors")
    return {n: not isinstance(modules[n], nn.Linear) for n in names}


def _folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def export_compressed(model_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Write the compressed folder of a pruned model folder; returns the size report (``compression.json``)."""
    source = Path(model_dir)
    if not (source / "masks.safetensors").exists():
        raise ValueError(f"{source} has no masks.safetensors: export a sparsesolve prune or retrain output folder")
    folder = OutputFolder(out, overwrite=overwrite)
    folder.check()
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    masks = {n: m.to(torch.bool) for n, m in load_file(str(source / "masks.safetensors")).items()}
    transposed = _linear_modules(model, list(masks))
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        if tensor.data_ptr() in seen:
            aliases[key] = seen[tensor.data_ptr()]
            continue
        seen[tensor.data_ptr()] = key
        value = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in masks:
            weight = value.T if transposed[name] else value
            parts, encoding = pack(weight, masks[name], name)
            tensors.update(parts)
            encodings[name] = {"encoding": encoding, "shape": list(weight.shape), "transposed": transposed[name]}
        else:
            tensors[key] = value.contiguous()
    folder.begin()
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith(("model", "masks")) and item.suffix != ".partial":
            shutil.copy2(item, folder.staging / item.name)
    metadata = {"format": FORMAT, "encodings": json.dumps(encodings), "aliases": json.dumps(aliases)}
    save_file(tensors, str(folder.staging / COMPRESSED_FILE), metadata=metadata)
    numel = sum(t.numel() for k, t in state.items() if k not in aliases)
    report = {"format": FORMAT, "source": str(source), "value_dtype": str(dtype or "as saved"),
              "bytes": {"compressed": (folder.staging / COMPRESSED_FILE).stat().st_size,
                        "source_weights": _folder_bytes(source, "model*.safetensors"),
                        "source_masks": (source / "masks.safetensors").stat().st_size,
                        "dense_float32": 4 * numel, "dense_float16": 2 * numel},
              "encodings": {e: sum(v["encoding"] == e for v in encodings.values()) for e in ("bitmask", "indices")},
              "pruned_linears": len(encodings)}
    folder.write_json("compression.json", report)
    folder.finish()
    return report


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
        weight = unpack(tensors, name, tuple(info["shape"]), info["encoding"])
        state[f"{name}.weight"] = weight.T.contiguous() if info["transposed"] else weight
    for key, target in aliases.items():
        state[key] = state[target]
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype if dtype is None else dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in aliases]:
        raise ValueError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
