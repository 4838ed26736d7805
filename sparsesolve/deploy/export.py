"""Compressed export of a pruned model: kept values plus a packed bitmask, or column indices where smaller.

For every pruned linear (``masks.safetensors`` of a ``sparsesolve prune`` or ``retrain`` folder) the
``out x in`` weight ``W`` with keep-mask ``M`` is stored as

- ``NAME.values``: ``W[M]`` in row-major order (``k`` values, the model's dtype or ``dtype``); for a
  model pruned with ``--wbits b`` instead the grid its pruner quantised it on (``quantization.safetensors``
  of the pruned folder): ``NAME.scales`` (float32) and ``NAME.offsets`` (int16) per row and group, and
  ``NAME.codes``, each kept value's ``b``-bit code (two per byte for ``b <= 4``), so the value is
  ``scale * (code + offset)``, cast to the weight's dtype (with ``dtype`` the codes are the same and
  the weight is cast on load); and
- ``bitmask``: ``NAME.bitmask``, ``M`` packed 8 inputs per byte (``out x ceil(in / 8)`` uint8), or
- ``indices``: ``NAME.row_counts`` (kept entries per row) and ``NAME.columns`` (their input indices),
  both int16 when ``in <= 32767`` (else int32), CSR without the prefix sum,

whichever takes fewer bytes (the bitmask costs ``in / 8`` bytes per row, indices ``2 (1 + k_row)``:
indices win below about 1/16 density). Every other tensor is stored as is; tied tensors once. The result is one
``model.compressed.safetensors`` next to the config and tokenizer, and ``compression.json`` with the
sizes; ``load_model`` reads it back (``sparsesolve.lm.compressed``) to exactly the saved weights (bit for bit in the stored dtype).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from sparsesolve.core.quantize import QuantizationGrid
from sparsesolve.lm.compressed import COMPRESSED_FILE, FORMAT
from sparsesolve.lm.models import readable
from sparsesolve.lm.output import GRIDS_FILE, OutputFolder, read_grids

__all__ = ["copy_side_files", "export_compressed", "on_grid_codes", "pack", "read_pruned"]



def pack(weight: torch.Tensor, mask: torch.Tensor, name: str,
         grid: QuantizationGrid | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of one pruned ``out x in`` weight and the mask encoding chosen (module docstring);
    with the ``grid`` its pruner quantised it on, the kept values as codes on that grid."""
    if weight.shape != mask.shape:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match the weight {tuple(weight.shape)}")
    if (weight[~mask] != 0).any():
        raise ValueError(f"{name} has non-zero weights outside its mask: export a pruned (projected) model")
    out_features, in_features = mask.shape
    tensors = {f"{name}.values": weight[mask].contiguous()} if grid is None else _grid_codes(weight, mask, name, grid)
    bitmask_bytes = out_features * ((in_features + 7) // 8)
    index_dtype = torch.int16 if in_features <= 32767 else torch.int32
    index_bytes = (out_features + int(mask.sum())) * (2 if index_dtype == torch.int16 else 4)
    if bitmask_bytes <= index_bytes:
        packed = torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=1))
        return {**tensors, f"{name}.bitmask": packed}, "bitmask"
    columns = mask.nonzero()[:, 1].to(index_dtype)
    return {**tensors, f"{name}.row_counts": mask.sum(dim=1).to(index_dtype), f"{name}.columns": columns}, "indices"


def _grid_codes(weight: torch.Tensor, mask: torch.Tensor, name: str, grid: QuantizationGrid) -> dict[str, torch.Tensor]:
    """``NAME.scales`` (float32) and ``NAME.offsets`` (``-zero``, int16) per row and group, and
    ``NAME.codes`` per kept value (row-major; two per byte for ``bits <= 4``), after checking that every
    kept value is its grid point in the weight's dtype (a weight changed after pruning is refused)."""
    kept = on_grid_codes(weight, mask, name, grid)[mask].to(torch.uint8)
    if grid.bits <= 4:
        padded = torch.cat([kept, kept.new_zeros(len(kept) % 2)])
        kept = padded[0::2] | (padded[1::2] << 4)
    return {f"{name}.scales": grid.scale.float().contiguous(), f"{name}.offsets": (-grid.zero).to(torch.int16).contiguous(),
            f"{name}.codes": kept}


def _linear_modules(model: PreTrainedModel, names: list[str]) -> dict[str, bool]:
    """Whether each named module stores its weight transposed (GPT-2's Conv1D: ``in x out``); names of
    other pruned parameters (an MoE's 3-D expert tensors, ``MODULE.PARAM``) are left out: they are
    stored as they are, zeros included."""
    modules, parameters = dict(model.named_modules()), dict(model.named_parameters())
    missing = [n for n in names if n not in modules and n not in parameters]
    if missing:
        raise ValueError(f"the model has no module {missing[0]!r} named in masks.safetensors")
    return {n: not isinstance(modules[n], nn.Linear) for n in names if n in modules}


def read_pruned(source: Path, out: OutputFolder) -> tuple[PreTrainedModel, dict[str, torch.Tensor],
                                                       dict[str, QuantizationGrid]]:
    """The model, keep-masks and quantisation grids of a pruned folder, after checking it is one and that
    ``out`` may be written (one-line ``ValueError``s)."""
    if not source.is_dir():
        raise ValueError(f"model folder {source} does not exist; give a sparsesolve prune or retrain output folder")
    if not (source / "masks.safetensors").exists():
        raise ValueError(f"{source} has no masks.safetensors: export a sparsesolve prune or retrain output folder")
    out.check()
    with readable(source):
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
        masks = {n: m.to(torch.bool) for n, m in load_file(str(source / "masks.safetensors")).items()}
    return model, masks, read_grids(source)


def copy_side_files(source: Path, staging: Path) -> None:
    """Copy the config, tokenizer and other small files of a pruned folder (not its weights, masks, grids)."""
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith(("model", "masks")) and item.name != GRIDS_FILE and item.suffix != ".partial":
            shutil.copy2(item, staging / item.name)


def on_grid_codes(weight: torch.Tensor, mask: torch.Tensor, name: str, grid: QuantizationGrid) -> torch.Tensor:
    """The ``out x in`` int16 codes of ``weight`` on ``grid``, after checking that every kept value is its
    grid point in the weight's dtype (a weight changed after pruning is refused)."""
    codes = grid.codes(weight)
    columns = torch.arange(weight.shape[1]) // grid.groupsize
    values = grid.scale[:, columns] * (codes - grid.zero[:, columns]).float()
    if not torch.equal(values.to(weight.dtype)[mask], weight[mask]):
        raise ValueError(f"{name}'s kept weights are not on the quantisation grid its pruner saved: "
                         "export the folder sparsesolve prune wrote, or delete quantization.safetensors")
    return codes


def _folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def export_compressed(model_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Write the compressed folder of a pruned model folder; returns the size report (``compression.json``)."""
    source = Path(model_dir)
    folder = OutputFolder(out, overwrite=overwrite)
    model, masks, grids = read_pruned(source, folder)
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
        if key.endswith(".weight") and name in transposed:
            source_weight = tensor if name in grids else value  # codes from the saved values; cast on load
            weight = source_weight.T if transposed[name] else source_weight
            parts, encoding = pack(weight, masks[name], name, grids.get(name))
            tensors.update(parts)
            encodings[name] = {"encoding": encoding, "shape": list(weight.shape), "transposed": transposed[name],
                               "quantization": None if name not in grids else [grids[name].bits, grids[name].groupsize],
                               "dtype": str(value.dtype).removeprefix("torch.")}
        else:
            tensors[key] = value.contiguous()
    folder.begin()
    copy_side_files(source, folder.staging)
    metadata = {"format": FORMAT, "encodings": json.dumps(encodings), "aliases": json.dumps(aliases)}
    save_file(tensors, str(folder.staging / COMPRESSED_FILE), metadata=metadata)
    numel = sum(t.numel() for k, t in state.items() if k not in aliases)
    report = {"format": FORMAT, "source": str(source), "value_dtype": str(dtype or "as saved"),
              "quantization": next(({"bits": g.bits, "groupsize": g.groupsize} for g in grids.values()), None),
              "bytes": {"compressed": (folder.staging / COMPRESSED_FILE).stat().st_size,
                        "source_weights": _folder_bytes(source, "model*.safetensors"),
                        "source_masks": (source / "masks.safetensors").stat().st_size,
                        "dense_float32": 4 * numel, "dense_float16": 2 * numel},
              "encodings": {e: sum(v["encoding"] == e for v in encodings.values()) for e in ("bitmask", "indices")},
              "pruned_linears": len(encodings), "pruned_parameters_stored_dense": sorted(set(masks) - set(transposed))}
    folder.write_json("compression.json", report)
    folder.finish()
    return report
