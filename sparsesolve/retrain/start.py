"""Where retraining starts: a one-shot sparsesolve output (warm start) or the dense model (the paper's start).

- Warm start (``from_dir``: a ``sparsesolve prune`` output folder, any method): the kept weights are
  the one-shot reconstruction, the masks come from its ``masks.safetensors``; the pruned positions
  hold zeros (``pruned="zero"``) or the dense teacher's values (``pruned="dense"``, so the decay can
  shrink them or the mask refresh bring them back).
- The paper's start (``from_dir=None``): the dense weights with magnitude masks.

Every linear of every decoder layer is wrapped (``SparseLinear``); embeddings and the head stay dense.
SLoRB (when on) starts from the dense teacher's weights at the pruned positions, whatever the start.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from sparsesolve.core.patterns import Pattern
from sparsesolve.lm.adapters import get_adapter
from sparsesolve.retrain.sparse_linear import TWO_FOUR, SparseLinear, wrap_linears

__all__ = ["decoder_linear_names", "sparse_student"]


def decoder_linear_names(model: PreTrainedModel) -> list[str]:
    """Full module names of every prunable linear of every decoder layer."""
    adapter = get_adapter(model)
    return [lin.name for i in range(len(adapter.layers(model))) for lin in adapter.layer_map(model, i).linears]


def sparse_student(student: PreTrainedModel, teacher: PreTrainedModel, from_dir: str | Path | None,
                   pruned: str = "zero", pattern: Pattern = TWO_FOUR, slorb_k: int | None = None,
                   slorb_trainable_projection: bool = False) -> dict[str, SparseLinear]:
    """Wrap ``student``'s decoder linears in place (module docstring); returns the wrappers by name."""
    if pruned not in ("zero", "dense"):
        raise ValueError(f"pruned positions hold 'zero' or 'dense' values, got {pruned!r}")
    names = decoder_linear_names(student)
    masks = None
    if from_dir is not None:
        path = Path(from_dir) / "masks.safetensors"
        if not path.exists():
            raise ValueError(f"{from_dir} has no masks.safetensors: warm starts need a sparsesolve prune output folder")
        saved = load_file(str(path))
        missing = [n for n in names if n not in saved]
        if missing:
            raise ValueError(f"{path} has no mask for {missing[0]} (and {len(missing) - 1} more): pruned with other layers?")
        masks = {n: saved[n].to(torch.bool) for n in names}
        for n in names:
            pattern.check_mask(masks[n])
    modules = dict(teacher.named_modules())
    dense = {name: (modules[name].weight.T if not isinstance(modules[name], torch.nn.Linear) else modules[name].weight)
             .detach() for name in names}
    # SLoRB from the teacher's pruned weights, the paper's formula for every start
    layers = wrap_linears(student, names, masks, pattern, slorb_k, slorb_trainable_projection, slorb_dense=dense)
    if from_dir is not None and pruned == "dense":
        with torch.no_grad():
            for name, layer in layers.items():
                w = layer.weight_out_in()
                w.copy_(torch.where(layer.mask, w, dense[name].to(w.dtype)))
    return layers
