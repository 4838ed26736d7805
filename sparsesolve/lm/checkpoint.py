"""Per-layer checkpoints, so a long pruning run killed part-way can continue where it stopped.

After decoder layer ``l`` is pruned, ``layer_{l:04d}.pt`` holds its pruned weights, masks and its
report record. The file is written to a temporary name and renamed, so a kill leaves either a whole
checkpoint or none. ``run.json`` holds the run's settings; resuming with different settings is
refused, because the result would match neither run. A setting added to the package after a manifest
was written is read there as its default (``defaults``), which is what the older code did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparsesolve.core.quantize import QuantizationGrid
from sparsesolve.lm.output import atomic_write

__all__ = ["LayerCheckpoints"]


class LayerCheckpoints:
    """A folder of per-layer checkpoints for one run, identified by its ``settings``; ``defaults`` holds
    what a setting missing from an older manifest stood for."""

    def __init__(self, folder: Path | str, settings: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))
        self.defaults = json.loads(json.dumps(defaults or {}))

    def open(self, resume: bool) -> list[int]:
        """Create the folder (fresh run) or check it belongs to the same run (resume); returns the layers
        already done."""
        manifest = self.folder / "run.json"
        if resume and manifest.exists():
            saved = json.loads(manifest.read_text())
            saved = {**{k: v for k, v in self.defaults.items() if k not in saved and k in self.settings}, **saved}
            if saved != self.settings:
                changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
                raise ValueError(f"cannot resume: the checkpoints in {self.folder} were made with different settings "
                                 f"({', '.join(changed)}); start again with --overwrite")
            return self.done()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(manifest, lambda path: path.write_text(json.dumps(self.settings, indent=2)))
        return []

    def done(self) -> list[int]:
        """Indices of the layers with a complete checkpoint."""
        return sorted(int(p.stem.split("_")[1]) for p in self.folder.glob("layer_*.pt"))

    def save(self, index: int, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
             record: dict[str, Any], grids: dict[str, QuantizationGrid] | None = None) -> None:
        """Store layer ``index``'s pruned weights (``(out, in)`` by linear name), masks, record and
        quantisation grids (their scales and zeros; bits and group size are run settings)."""
        payload = {"weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
                   "masks": {k: v.cpu() for k, v in masks.items()}, "record": record,
                   "grids": {k: {"scale": g.scale.cpu(), "zero": g.zero.cpu()} for k, g in (grids or {}).items()}}
        atomic_write(self.folder / f"layer_{index:04d}.pt", lambda path: torch.save(payload, path))

    def load(self, index: int) -> dict[str, Any]:
        """``{"weights", "masks", "record", "grids"}`` of layer ``index``."""
        return torch.load(self.folder / f"layer_{index:04d}.pt", map_location="cpu", weights_only=True)

