"""The package's folders are its layers: imports flow downwards only, and nothing imports the package face."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparsesolve"
#: lowest first; modules of one floor may import each other, of a lower floor freely, of a higher never.
#: deploy and retrain share a floor but are siblings: neither imports the other.
FLOORS = {"version": 0, "core": 1, "lm": 2, "deploy": 3, "retrain": 3}
TOP = 4  # config, flags, pipeline, api, cli, demo, __main__


def _floor(module: str) -> tuple[int, str]:
    part = module.split(".")[1] if module.count(".") else ""
    return FLOORS.get(part, TOP), part


def _imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsesolve") and node.level == 0:
            found += [(node.module, node.lineno)] if node.module != "sparsesolve" else [("sparsesolve", node.lineno)]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("sparsesolve")]
    return found


def test_imports_flow_one_way_and_never_through_the_face() -> None:
    offences = []
    for path in PACKAGE.rglob("*.py"):
        module = "sparsesolve." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        floor, part = _floor(module)
        for target, line in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if target == "sparsesolve":
                offences.append(where + " (the package face)")
                continue
            target_floor, target_part = _floor(target)
            if target_floor > floor or (target_floor == floor == 3 and target_part != part):
                offences.append(where)
    assert not offences, "\n".join(offences)


def test_every_module_sits_in_a_known_layer() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "__main__", "version", "config", "flags", "pipeline", "api", "cli", "demo"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(FLOORS) - {"version"}
