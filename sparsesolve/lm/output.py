"""The output folder of a pruning run, written atomically.

Everything is written into ``DIR.partial`` (next to ``DIR``) and renamed to ``DIR`` only when the run
has finished, so ``DIR`` is either absent or complete. ``DIR.partial`` also holds the per-layer
checkpoints of a run in progress, which ``--resume`` continues. An existing ``DIR`` is replaced only
with ``overwrite=True``.

A finished folder is a plain transformers model folder (pruned weights with zeros in place, config,
tokenizer) plus ``masks.safetensors`` (boolean keep-masks ``(out, in)`` by module name), for a quantising
run ``quantization.safetensors`` (``NAME.scale`` float32 and ``NAME.zero`` int16 per row and group, bits
and group size in its metadata: the grids the kept weights lie on) and ``report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsesolve.core.quantize import QuantizationGrid

__all__ = ["GRIDS_FILE", "OutputFolder", "atomic_write", "read_grids"]

GRIDS_FILE = "quantization.safetensors"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on ``PATH.tmp`` and rename it to ``path``: a kill leaves the old file or the new, never half."""
    partial = path.with_name(path.name + ".tmp")
    write(partial)
    os.replace(partial, path)


def _check_writable(path: Path) -> None:
    """One-line ``ValueError`` unless a folder can be created at ``path``: its nearest existing ancestor
    must be a folder this process can write in (probed with a temporary file, removed at once)."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{ancestor} is a file, so {path} cannot be created; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        raise ValueError(f"cannot write in {ancestor} ({error.strerror or error}); choose another --out") from None


class OutputFolder:
    """Staging, checkpoints and the final atomic rename of one run's output folder."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        self.path = Path(path)
        self.staging = self.path.with_name(self.path.name + ".partial")
        self.overwrite, self.resume = overwrite, resume

    @property
    def checkpoints(self) -> Path:
        """Where the per-layer checkpoints live while the run is in progress."""
        return self.staging / "checkpoints"

    def check(self) -> None:
        """Refuse to clobber anything before any work starts (one-line ``ValueError``s)."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not a folder; choose another --out")
        if self.path.exists() and not self.overwrite:
            raise ValueError(f"{self.path} already exists; pass --overwrite to replace it or choose another --out")
        if self.staging.exists() and not (self.resume or self.overwrite):
            raise ValueError(f"{self.staging} holds an interrupted run; pass --resume to continue it "
                             "or --overwrite to start again")
        _check_writable(self.path)

    def begin(self) -> bool:
        """Create (or, resuming, reuse) the staging folder; True when an earlier run is resumed."""
        self.check()
        if self.staging.exists() and self.resume:
            return True
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return False

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON file saved in the staging folder by this run (or the run it resumes)."""
        path = self.staging / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, name: str, value: dict[str, Any]) -> None:
        """Write ``value`` as ``name`` in the staging folder (atomically)."""
        atomic_write(self.staging / name, lambda path: path.write_text(json.dumps(value, indent=2) + "\n"))

    def commit(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
               masks: dict[str, torch.Tensor], report: dict[str, Any],
               grids: dict[str, QuantizationGrid] | None = None) -> Path:
        """Save model, tokenizer, masks, grids and report, drop the checkpoints, and rename into place."""
        model.save_pretrained(self.staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.staging)
        save_file({name: mask.contiguous().cpu() for name, mask in masks.items()}, str(self.staging / "masks.safetensors"))
        if grids:
            first = next(iter(grids.values()))
            tensors = {f"{name}.{part}": getattr(grid, part).contiguous().cpu()
                       for name, grid in grids.items() for part in ("scale", "zero")}
            save_file(tensors, str(self.staging / GRIDS_FILE),
                      metadata={"bits": str(first.bits), "groupsize": str(first.groupsize)})
        self.write_json("report.json", report)
        return self.finish()

    def finish(self) -> Path:
        """Drop the checkpoints and rename the staging folder into place (replacing an old one)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        (self.staging / "dense.json").unlink(missing_ok=True)
        old = self.path.with_name(self.path.name + ".old")
        if self.path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
        os.replace(self.staging, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return self.path


def read_grids(folder: str | Path) -> dict[str, QuantizationGrid]:
    """The quantisation grids saved in ``FOLDER/quantization.safetensors`` by module name (empty if none)."""
    path = Path(folder) / GRIDS_FILE
    if not path.exists():
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    bits, groupsize = int(meta["bits"]), int(meta["groupsize"])
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: QuantizationGrid(bits, groupsize, tensors[f"{name}.scale"], tensors[f"{name}.zero"]) for name in names}
