"""``sparsesolve retrain`` end to end on a tiny model, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_lm import save_tiny, tiny_tokenizer

from sparsesolve.cli import main
from sparsesolve.lm.corpora import load_text

SMALL = ["--tokens", "256", "--seq-len", "32", "--batch-size", "4", "--eval-windows", "1", "--quiet"]


def test_retrain_command_writes_a_folder_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    tiny = save_tiny(tmp_path / "tiny", "gpt2", tiny_tokenizer(load_text("wiki", "train")[:50_000]))
    out = tmp_path / "ast"
    assert main(["retrain", "--teacher", str(tiny), "--out", str(out), "--slorb", "16", *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["start"]["from"] == "dense + magnitude" and (out / "slorb.safetensors").exists()
    capsys.readouterr()
    assert main(["retrain", "--teacher", str(tiny), "--out", str(out), *SMALL]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["retrain", "--teacher", str(tiny), "--from", str(tiny), "--out", str(tmp_path / "b"), *SMALL]) == 2
    assert "masks.safetensors" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["retrain", "--teacher", str(tiny), "--out", str(tmp_path / "c"), "--decay", "both", *SMALL]) == 2
    assert "decay must be" in capsys.readouterr().err
