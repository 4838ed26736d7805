"""Compressed export of a pruned model: kept values plus a packed bitmask, or column indices where smaller.

For every pruned linear (``masks.safetensors`` of a ``sparsesolve prune`` or ``retrain`` folder) the
``out x in`` weight ``W`` with keep-mask ``M`` is stored as

- ``NAME.values``: ``W[M]`` in row-major order (``k`` values, the model's dtype or ``dtype``); for a
  model pruned with ``--wbits b`` (its ``report.json`` says so) instead ``NAME.codebook``, the at most
  ``2^b`` distinct kept values of each row and quantisation group, and ``NAME.codes``, each kept
  value's ``b``-bit index into it (two per byte for ``b <= 4``); or, smaller, the group's grid itself
  (``NAME.scales`` float32 and ``NAME.offsets`` per row and group) when it is recovered bit for bit
  from the values (always from the saved float32 values: with ``dtype`` the codes are the same and the
  weight is cast to ``dtype`` on load); and
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
PACKED_PARTS = ("values", "bitmask", "row_counts", "columns", "codebook", "codes", "scales", "offsets")


def pack(weight: torch.Tensor, mask: torch.Tensor, name: str,
         quantization: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of one pruned ``out x in`` weight and the mask encoding chosen (module docstring);
    ``quantization`` ``(bits, groupsize)``: the kept values as codes into a per-row, per-group codebook."""
    if weight.shape != mask.shape:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match the weight {tuple(weight.shape)}")
    if (weight[~mask] != 0).any():
        raise ValueError(f"{name} has non-zero weights outside its mask: export a pruned (projected) model")
    out_features, in_features = mask.shape
    values = weight[mask].contiguous()
    tensors = {f"{name}.values": values} if quantization is None else _codebook(weight, mask, name, *quantization)
    bitmask_bytes = out_features * ((in_features + 7) // 8)
    index_dtype = torch.int16 if in_features <= 32767 else torch.int32
    index_bytes = (out_features + int(mask.sum())) * (2 if index_dtype == torch.int16 else 4)
    if bitmask_bytes <= index_bytes:
        packed = torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=1))
        return {**tensors, f"{name}.bitmask": packed}, "bitmask"
    columns = mask.nonzero()[:, 1].to(index_dtype)
    return {**tensors, f"{name}.row_counts": mask.sum(dim=1).to(index_dtype), f"{name}.columns": columns}, "indices"


def _grid_codes(weight: torch.Tensor, mask: torch.Tensor, bits: int, groupsize: int) -> dict[str, torch.Tensor] | None:
    """Recover each row-group's grid ``v = fl(scale * (code + offset))`` from the kept values, verified
    bit for bit: ``scale`` (float32) and ``offset`` (int16, the lowest step) per row and group, a
    ``bits``-bit ``code`` per kept value. The scale
    is tried as ``a / k`` for the group's smallest non-zero magnitude ``a`` and ``k = 1 .. 2^bits``;
    None when some group has no such grid (the caller stores a codebook instead)."""
    out_features, in_features = mask.shape
    groups = -(-in_features // groupsize)
    rows, cols = mask.nonzero(as_tuple=True)
    keys = rows * groups + cols // groupsize
    values = weight[rows, cols].float()
    if weight.dtype != torch.float32 or not torch.equal(values.to(weight.dtype), weight[rows, cols]):
        return None
    big = torch.full((out_features * groups,), float("inf"))
    smallest = big.scatter_reduce(0, keys, torch.where(values != 0, values.abs(), torch.inf), "amin")
    scale = torch.where(torch.isfinite(smallest), smallest, torch.ones_like(smallest))
    found = ~torch.isfinite(smallest)  # all-zero groups: any scale, code = zero
    ks = torch.zeros_like(values)
    candidates = ((smallest.double() / k).float() for k in range(1, 2**bits + 1))
    for base in candidates:
        for trial in (base, torch.nextafter(base, base * 2), torch.nextafter(base, base / 2)):
            scale, found, ks = _try_scale(values, keys, trial, scale, found, ks, bits)
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    low = torch.zeros(out_features * groups).scatter_reduce(0, keys, ks, "amin", include_self=False)
    codes = (ks - low[keys]).to(torch.uint8)
    if bits <= 4:
        padded = torch.cat([codes, codes.new_zeros(len(codes) % 2)])
        codes = padded[0::2] | (padded[1::2] << 4)
    return {"scales": scale.reshape(out_features, groups), "offsets": low.to(torch.int16).reshape(out_features, groups),
            "codes": codes}


def _try_scale(values: torch.Tensor, keys: torch.Tensor, trial: torch.Tensor, scale: torch.Tensor, found: torch.Tensor,
               ks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept ``trial`` (one scale per group) where every kept value is exactly ``trial * step`` with the
    steps spanning at most ``2^bits`` codes; groups already found keep theirs."""
    trial = torch.where(found, scale, trial)
    steps = torch.round(values / trial[keys])
    exact = (trial[keys] * steps == values).float()
    low = torch.zeros_like(trial).scatter_reduce(0, keys, steps, "amin", include_self=False)
    high = torch.zeros_like(trial).scatter_reduce(0, keys, steps, "amax", include_self=False)
    good = (torch.ones_like(trial).scatter_reduce(0, keys, exact, "amin") == 1) & (high - low <= 2**bits - 1)
    newly = good & ~found
    return torch.where(newly, trial, scale), found | newly, torch.where(newly[keys], steps, ks)


def _codebook(weight: torch.Tensor, mask: torch.Tensor, name: str, bits: int, groupsize: int) -> dict[str, torch.Tensor]:
    """The quantised kept values: ``NAME.scales``, ``NAME.offsets`` and ``NAME.codes`` when every group's
    grid is recovered exactly (``_grid_codes``), else ``NAME.codebook`` (``out x groups x 2^bits``, the
    distinct kept values of each row and group, ascending, zero-padded) with ``NAME.codes`` (each kept
    value's index, row-major; two per byte for ``bits <= 4``). Refuses a weight with more than
    ``2^bits`` distinct kept values in a group."""
    grid = _grid_codes(weight, mask, bits, groupsize)
    if grid is not None:
        return {f"{name}.{key}": value for key, value in grid.items()}
    out_features, in_features = mask.shape
    groups = -(-in_features // groupsize)
    rows, cols = mask.nonzero(as_tuple=True)
    keys = rows * groups + cols // groupsize
    pairs = torch.stack([keys.double(), weight[rows, cols].double()], dim=1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    first = torch.searchsorted(unique[:, 0].contiguous(), unique[:, 0].contiguous(), side="left")
    position = torch.arange(len(unique)) - first
    if len(unique) and int(position.max()) >= 2**bits:
        raise ValueError(f"{name} has more than {2**bits} distinct values in a group of {groupsize}: "
                         f"it was not quantised to {bits} bits with that group size")
    codebook = torch.zeros(out_features * groups, 2**bits, dtype=weight.dtype)
    codebook[unique[:, 0].long(), position] = unique[:, 1].to(weight.dtype)
    codes = position[inverse].to(torch.uint8)
    if bits <= 4:
        padded = torch.cat([codes, codes.new_zeros(len(codes) % 2)])
        codes = padded[0::2] | (padded[1::2] << 4)
    return {f"{name}.codebook": codebook.reshape(out_features, groups, 2**bits), f"{name}.codes": codes}


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
        if f"{name}.codebook" in tensors:
            values = tensors[f"{name}.codebook"][rows, group, codes]
        else:
            steps = (codes + tensors[f"{name}.offsets"][rows, group].long()).float()
            values = tensors[f"{name}.scales"][rows, group] * steps
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
    saved_report = json.loads((source / "report.json").read_text()) if (source / "report.json").exists() else {}
    quant = saved_report.get("quantization")
    quantization = None if quant is None else (quant["bits"], quant["groupsize"])
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
            source_weight = tensor if quantization else value  # grid codes are recovered from the saved values
            weight = source_weight.T if transposed[name] else source_weight
            parts, encoding = pack(weight, masks[name], name, quantization)
            tensors.update(parts)
            encodings[name] = {"encoding": encoding, "shape": list(weight.shape), "transposed": transposed[name],
                               "quantization": quantization, "dtype": str(value.dtype).removeprefix("torch.")}
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
              "quantization": None if quantization is None else {"bits": quantization[0], "groupsize": quantization[1]},
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
