"""Run metadata and JSON output shared by the benchmark scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sparsesolve.lm.environment import environment
from sparsesolve.lm.output import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The current commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(module: str, seed: int) -> dict[str, Any]:
    """Command (``python -m MODULE ARGS``), commit, machine, threads, library versions, seed and date."""
    return {
        "command": " ".join(["python", "-m", module, *sys.argv[1:]]),
        "commit": git_commit(),
        **environment(),
        "seed": seed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(name: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    """Write ``payload`` to ``FOLDER/NAME.json`` (default ``benchmarks/results``) atomically; return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
    return path


def parse_options(text: str) -> dict[str, Any]:
    """``"iterations=2,prox=global"`` -> ``{"iterations": 2, "prox": "global"}`` (ints, floats, booleans, none)."""
    options: dict[str, Any] = {}
    for pair in filter(None, text.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"variant option {pair!r} is not key=value; write e.g. iterations=2,prox=global")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return options


def source_note(meta: dict[str, Any], setting: str) -> str:
    """The line under a README table: the command, commit and date of ``meta``, then ``setting``."""
    return f"\n\n_Source: `{meta['command']}` at commit `{meta['commit'][:12]}`, {meta['date']}; {setting}._\n"
