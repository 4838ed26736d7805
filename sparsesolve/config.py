"""What one run of the pipeline is: model, pruning, calibration, evaluation and output, validated once.

``RunConfig`` composes ``PruneConfig`` (``core.config``) with ``CalibrationConfig`` and
``EvaluationConfig``; ``pipeline.run_prune`` executes it and writes ``RunConfig.to_dict()`` into the
report. No torch import at import time (the command line's ``--help`` reads these).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsesolve.core.config import PruneConfig, option
from sparsesolve.lm.corpora import CORPORA

__all__ = ["CalibrationConfig", "EvaluationConfig", "RunConfig"]


def _check_corpus(field: str, name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"{field}: unknown corpus {name!r}; choose from {', '.join(CORPORA)}")


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration windows: ``windows`` random windows of ``seq_len`` tokens of a corpus's train split."""

    corpus: str = option("wiki", f"calibration corpus ({', '.join(CORPORA)}), or several comma-separated: the "
                                 "windows are then split evenly over their train splits", flag="--calib")
    windows: int = option(64, "calibration windows (64 x 512 tokens: protocol P1; the papers use 128 x 2048)",
                          flag="--nsamples")
    seq_len: int = option(512, "tokens per window (the papers use 2048)")
    seed: int = option(0, "seed of the window starts")

    def __post_init__(self) -> None:
        names = [c.strip() for c in self.corpus.split(",") if c.strip()]
        if not names or len(set(names)) < len(names):
            raise ValueError(f"calib: give one corpus or several distinct ones, comma-separated; got {self.corpus!r}")
        for name in names:
            _check_corpus("calib", name)
        object.__setattr__(self, "corpus", ",".join(names))
        if self.windows < 1:
            raise ValueError(f"--nsamples must be >= 1, got {self.windows}")
        if self.windows < len(names):
            raise ValueError(f"--nsamples {self.windows} cannot give a window to each of {len(names)} corpora")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {self.seq_len}")


@dataclass(frozen=True)
class EvaluationConfig:
    """Perplexity on the test splits of ``corpora``: the first ``windows`` windows of ``seq_len`` (0 = all)."""

    corpora: tuple[str, ...] = option(("wiki", "ptb"), "comma-separated test corpora ('none': no evaluation)",
                                      flag="--data")
    windows: int = option(64, "first N test windows per corpus (64: protocol P1); 0 = the whole split",
                          flag="--eval-windows")
    seq_len: int = option(512, "tokens per window")
    batch_size: int = option(4, "windows per forward pass")

    def __post_init__(self) -> None:
        corpora = self.corpora.split(",") if isinstance(self.corpora, str) else self.corpora
        corpora = tuple(c.strip() for c in corpora if c.strip() and c.strip() != "none")
        for name in corpora:
            _check_corpus("data", name)
        object.__setattr__(self, "corpora", corpora)
        for flag, value, low in (("--eval-windows", self.windows, 0), ("--seq-len", self.seq_len, 2),
                                 ("--batch-size", self.batch_size, 1)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")


@dataclass(frozen=True)
class RunConfig:
    """One pruning run: which model, how to prune it, on what, how to score it, where to save it."""

    model: str
    prune: PruneConfig
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    out: str | None = None
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if self.prune.method == "sparsellm":
            self.prune.coordinator(True).heldout_windows(self.calibration.windows)
        if self.evaluation.seq_len != self.calibration.seq_len:
            raise ValueError(f"calibration and evaluation windows differ ({self.calibration.seq_len} and "
                             f"{self.evaluation.seq_len} tokens): the protocol uses one seq_len")
        if self.resume and self.out is None:
            raise ValueError("resume needs an output folder (out) holding the interrupted run")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written into ``report.json``."""
        return {"model": self.model, "prune": self.prune.to_dict(),
                "calibration": vars(self.calibration).copy(), "evaluation": {**vars(self.evaluation),
                                                                             "corpora": list(self.evaluation.corpora)}}
