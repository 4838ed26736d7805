"""sparsesolve: prune neural networks by solving coordinated masked least-squares subproblems."""

from sparsesolve.api import METHODS, prune
from sparsesolve.chain import Chain, GatedMLP
from sparsesolve.coordinator import ChainResult, sparsellm
from sparsesolve.patterns import NM, Pattern, Unstructured, parse_pattern
from sparsesolve.solvers import SOLVERS, LayerSolution, admm, magnitude, refit, sparsegpt, wanda

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "NM",
    "SOLVERS",
    "Chain",
    "ChainResult",
    "GatedMLP",
    "LayerSolution",
    "Pattern",
    "Unstructured",
    "admm",
    "magnitude",
    "parse_pattern",
    "prune",
    "refit",
    "sparsegpt",
    "sparsellm",
    "wanda",
]
