"""sparsesolve: prune neural networks by solving coordinated masked least-squares subproblems.

The names below load on first use (PEP 562), so ``import sparsesolve`` and the command line's ``--help``
do not import torch. Layers, lowest first: ``core`` (optimisation, no transformers), ``lm`` (language
models), ``deploy`` (export, 2:4 kernels), ``retrain`` (AST); then ``config``, ``pipeline``, ``api``, ``cli``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from sparsesolve.version import __version__

_EXPORTS = {
    "prune": "sparsesolve.api", "prune_config": "sparsesolve.api",
    "PruneConfig": "sparsesolve.core.config", "SparseLLMConfig": "sparsesolve.core.config",
    "METHODS": "sparsesolve.core.config",
    "RunConfig": "sparsesolve.config", "CalibrationConfig": "sparsesolve.config", "EvaluationConfig": "sparsesolve.config",
    "run_prune": "sparsesolve.pipeline",
    "Chain": "sparsesolve.core.chain", "GatedMLP": "sparsesolve.core.chain",
    "ChainResult": "sparsesolve.core.coordinator", "sparsellm": "sparsesolve.core.coordinator",
    "PruneResult": "sparsesolve.lm.decoder", "prune_decoder": "sparsesolve.lm.decoder",
    "perplexity": "sparsesolve.lm.evaluate", "load_model": "sparsesolve.lm.models",
    "NM": "sparsesolve.core.patterns", "Pattern": "sparsesolve.core.patterns", "Unstructured": "sparsesolve.core.patterns",
    "parse_pattern": "sparsesolve.core.patterns",
    **{name: "sparsesolve.core.solvers" for name in ("SOLVERS", "LayerSolution", "admm", "magnitude", "refit",
                                                      "sparsegpt", "wanda")},
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsesolve' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted([*globals(), *_EXPORTS])
