"""sparsesolve: prune neural networks by solving coordinated masked least-squares subproblems."""

from sparsesolve.api import METHODS, prune
from sparsesolve.chain import Chain, GatedMLP
from sparsesolve.coordinator import ChainResult, sparsellm
from sparsesolve.decoder import PruneResult, prune_decoder
from sparsesolve.evaluate import perplexity
from sparsesolve.models import load_model
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
    "PruneResult",
    "Unstructured",
    "admm",
    "magnitude",
    "load_model",
    "parse_pattern",
    "perplexity",
    "prune",
    "prune_decoder",
    "refit",
    "sparsegpt",
    "sparsellm",
    "wanda",
]
