"""Layer-wise sparsity allocation: exact averages, OWL's ordering, the OBS curves against an exact
refit, optimality of the Lagrangian split, and whole decoders pruned under each allocation."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import VOCAB, tiny_model

from sparsesolve.core.config import PruneConfig
from sparsesolve.core.solvers import refit
from sparsesolve.lm.allocation import GRID_STEP, LayerStatistics, _statistics, allocate, sparsity_grid
from sparsesolve.lm.decoder import prune_decoder


def _stats(params: list[int], outliers: list[float], slopes: list[float], target: float = 0.7,
           spread: float = 0.08) -> dict[int, LayerStatistics]:
    """Layers with convex error curves ``slope * (s - 0.5)^2`` on the allocation grid."""
    grid = sparsity_grid(target, spread)
    return {i: LayerStatistics(p, o, grid, k * (grid - 0.5) ** 2) for i, (p, o, k) in enumerate(zip(params, outliers, slopes))}


def _average(sparsity: dict[int, float], stats: dict[int, LayerStatistics]) -> float:
    return sum(sparsity[i] * s.params for i, s in stats.items()) / sum(s.params for s in stats.values())


@pytest.mark.parametrize("kind", ["uniform", "owl", "obs"])
def test_every_allocation_keeps_the_weighted_average_and_the_range(kind: str) -> None:
    stats = _stats([100, 100, 300, 50], [0.01, 0.05, 0.02, 0.0], [1.0, 5.0, 2.0, 0.5])
    sparsity = allocate(kind, 0.7, stats, 0.08)
    assert abs(_average(sparsity, stats) - 0.7) < 1e-12
    low, high = (0.7 - 0.16, 0.7 + 0.16) if kind == "owl" else (0.62, 0.78)     # OWL spans 2 x 0.08
    assert all(low - 1e-12 <= s <= high + 1e-12 for s in sparsity.values())
    assert kind != "owl" or max(sparsity.values()) - min(sparsity.values()) == pytest.approx(0.16)
    if kind == "uniform":
        assert set(sparsity.values()) == {0.7}


def test_owl_keeps_the_layers_with_more_outliers_denser_over_twice_the_range() -> None:
    stats = _stats([100] * 4, [0.03, 0.01, 0.05, 0.02], [1.0] * 4)
    sparsity = allocate("owl", 0.7, stats, 0.08)
    assert sorted(sparsity, key=sparsity.get) == [2, 0, 3, 1]
    assert max(sparsity.values()) - min(sparsity.values()) == pytest.approx(0.16)


def test_obs_split_cannot_be_improved_by_moving_zeros_between_two_layers() -> None:
    """With equal layers the budget moves in grid steps; convex curves make a local optimum global."""
    slopes = [1.0, 1.2, 0.9, 1.1]                 # optimum s - 0.5 proportional to 1 / slope: inside the range
    stats = _stats([100] * 4, [0.0] * 4, slopes)
    sparsity = allocate("obs", 0.7, stats, 0.08)
    assert sparsity[2] > sparsity[0] > sparsity[3] > sparsity[1]       # flatter curve, more zeros
    assert all(0.62 < v < 0.78 for v in sparsity.values())

    def total(alloc: dict[int, float]) -> float:
        return sum(k * (s - 0.5) ** 2 for s, k in zip(alloc.values(), slopes))

    for give in range(4):
        for take in range(4):
            moved = dict(sparsity)
            moved[give] -= GRID_STEP
            moved[take] += GRID_STEP
            if give != take and all(0.62 <= v <= 0.78 for v in moved.values()):
                assert total(moved) >= total(sparsity) - 1e-12


def test_obs_saliency_of_one_weight_is_the_exact_refit_error_of_pruning_it() -> None:
    """At the grid point of one zero per row the curve is the sum over rows of each row's smallest
    ``w^2 / [Hd^-1]_jj``; pruning exactly that weight and refitting the row costs the same."""
    torch.manual_seed(0)
    n = 8
    linear = torch.nn.Linear(n, 3, bias=False).double()
    x = torch.randn(50, n, dtype=torch.float64)
    gram = x.T @ x

    class Lin:
        module, index = linear, None
        weight = linear.weight.detach()

    grid = torch.tensor([0.0, 1 / n])
    stats = _statistics([Lin()], {id(linear): gram}, grid, damp=0.0, params=3 * n)
    w = Lin.weight
    saliency = w**2 / torch.diagonal(torch.linalg.inv(gram))
    mask = saliency > saliency.min(dim=1, keepdim=True).values       # each row loses its cheapest weight
    exact = refit(w, gram, mask, damp=0.0)
    assert stats.errors[0] == 0
    assert float(stats.errors[1]) == pytest.approx(exact.error / exact.reference, rel=1e-9)


@pytest.mark.parametrize("kind", ["owl", "obs"])
def test_a_decoder_pruned_under_an_allocation_keeps_its_average_sparsity(kind: str) -> None:
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    uniform = prune_decoder(tiny_model("llama", layers=4), windows, PruneConfig("0.6", method="sparsegpt"), progress=False)
    result = prune_decoder(tiny_model("llama", layers=4), windows,
                           PruneConfig("0.6", method="sparsegpt", allocation=kind, allocation_range=0.1), progress=False)
    assert sorted(result.allocation) == [0, 1, 2, 3] and len(set(result.allocation.values())) > 1
    assert all(0.4 - 1e-12 <= s <= 0.8 + 1e-12 for s in result.allocation.values())
    # the rows round their zeros, so the achieved average is the uniform one's to one weight per row
    assert abs(result.sparsity - uniform.sparsity) <= 4 / 64
    for record in result.layers:
        masks = [result.masks[name] for name in record.linears]
        achieved = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)
        assert abs(achieved - result.allocation[record.layer]) <= 1 / 64


def test_an_allocation_needs_an_unstructured_target() -> None:
    with pytest.raises(ValueError, match="allocation: 'owl' spreads an unstructured sparsity"):
        PruneConfig("2:4", allocation="owl")
    with pytest.raises(ValueError, match="unknown allocation 'best'"):
        PruneConfig("0.7", allocation="best")
