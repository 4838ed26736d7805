"""Every notebook runs top to bottom in its small configuration (so they never rot)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
REAL_MODEL = {"02_prune_language_model", "03_retrain_ast"}


def _run(path: Path) -> dict:
    """Execute the code cells in order in one namespace, as a kernel would."""
    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__main__"}
    for number, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name} cell {number}", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in REAL_MODEL else [])
                                  for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSESOLVE_NOTEBOOK_SMALL", "1")
    monkeypatch.chdir(tmp_path)
    namespace = _run(path)
    assert namespace["SMALL"] is True


def test_there_are_three_notebooks() -> None:
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart_mlp", "02_prune_language_model", "03_retrain_ast"]
