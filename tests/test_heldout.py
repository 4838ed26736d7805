"""Guards against over-fitting the calibration tokens: held-out selection of the coordinator's
candidates, the trust region toward the one-shot weights, and the damping centred on them (ridge)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import correlated_inputs
from tiny_lm import VOCAB, tiny_model
from torch import nn

import sparsesolve as ss
from sparsesolve.core.config import PruneConfig, SparseLLMConfig
from sparsesolve.core.coordinator import sparsellm, trust_region_cross
from sparsesolve.core.patterns import parse_pattern
from sparsesolve.core.solvers import cg_refit, refit
from sparsesolve.core.solvers.problem import LayerProblem
from sparsesolve.lm.decoder import HELDOUT_SEED, prune_decoder


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16)).double()


def test_candidates_are_chosen_by_their_error_on_the_held_out_tokens() -> None:
    """Few fitted tokens: the iterations over-fit them; the reported held-out errors are those of the
    candidates' weights, recomputed here, and the chosen one has the lowest."""
    dense = _mlp()
    x, held = correlated_inputs(80, 16, seed=1), correlated_inputs(400, 16, seed=2)
    model = copy.deepcopy(dense)
    result = sparsellm(ss.Chain.from_module(model), x, parse_pattern("0.7"), iterations=4, heldout=held)
    with torch.no_grad():
        assert result.heldout_error == pytest.approx(float(((model(held) - dense(held)) ** 2).sum()), rel=1e-9)
        assert result.heldout_reference == pytest.approx(float((dense(held) ** 2).sum()), rel=1e-12)
    held_errors = [result.start_heldout_error / result.heldout_reference] + [
        h["heldout_relative_error"] for h in result.history]
    assert result.best_iteration == min(range(5), key=held_errors.__getitem__)
    fitted = [result.start_error] + [h["error"] for h in result.history]
    assert result.error == fitted[result.best_iteration]


def test_trust_region_cross_is_the_ridge_toward_the_start_on_a_fixed_mask() -> None:
    """``refit`` with the modified cross-covariance minimises ||W X - T||^2 + rho ||(W - W0) X||^2:
    checked row by row against least squares on the stacked system."""
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(60, 10, generator=g, dtype=torch.float64), torch.randn(60, 4, generator=g, dtype=torch.float64)
    start = torch.randn(4, 10, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 10, generator=g) > 0.5
    rho, gram = 3.0, x.T @ x
    solved = refit(start, gram, mask, target=trust_region_cross(target.T @ x, start, gram, rho), damp=0.0).weight
    for i in range(4):
        kept = mask[i]
        design = torch.cat([x[:, kept], rho**0.5 * x[:, kept]])
        goal = torch.cat([target[:, i], rho**0.5 * (x @ start[i])])
        expected = torch.linalg.lstsq(design, goal[:, None]).solution[:, 0]
        assert torch.allclose(solved[i, kept], expected, atol=1e-10)


def test_a_large_trust_keeps_the_one_shot_weights_and_none_changes_nothing() -> None:
    dense, x = _mlp(), correlated_inputs(600, 16, seed=3)
    runs = {}
    for trust in (0.0, 1e9):
        model = copy.deepcopy(dense)
        runs[trust] = sparsellm(ss.Chain.from_module(model), x, parse_pattern("0.7"), iterations=2, trust=trust,
                                refine="exact")
    free, held = runs[0.0], runs[1e9]
    assert free.error < 0.9 * free.start_error
    for record in held.history:     # every iterate sits on the start (up to the solves' damping)
        assert record["error"] == pytest.approx(held.start_error, rel=2e-3)


@pytest.mark.parametrize("solve", ["exact", "cg"])
def test_an_anchored_problem_is_the_ridge_toward_the_anchor_on_a_fixed_mask(solve: str) -> None:
    """``LayerProblem.build(anchor=W0)`` then ``refit`` / ``cg_refit`` minimise
    ``||W X - T||^2 + lam ||W - W0||^2`` with ``lam = damp mean(diag H)``: row by row against least
    squares on the stacked system ``[X; sqrt(lam) I] w = [t; sqrt(lam) w0]`` over the kept inputs."""
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(30, 10, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    anchor = torch.randn(4, 10, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 10, generator=g) > 0.4
    gram, damp = x.T @ x, 0.3
    problem = LayerProblem.build(anchor, gram, target=target.T @ x, damp=damp, anchor=anchor)
    lam = damp * float(torch.diagonal(gram).mean())
    assert float(problem.cholesky.lam) == pytest.approx(lam, rel=1e-12)
    if solve == "exact":
        solved = refit(anchor, gram, mask, problem=problem).weight
    else:
        solved = cg_refit(anchor, gram, mask, start=torch.zeros_like(anchor), tol=1e-12, max_iter=200, problem=problem).weight
    for i in range(4):
        kept = mask[i]
        design = torch.cat([x[:, kept], lam**0.5 * torch.eye(10, dtype=torch.float64)[:, kept]])
        goal = torch.cat([target[:, i], lam**0.5 * anchor[i]])     # rows of pruned inputs: a constant
        expected = torch.linalg.lstsq(design, goal[:, None]).solution[:, 0]
        torch.testing.assert_close(solved[i, kept], expected, atol=1e-8, rtol=1e-8)
        assert torch.all(solved[i, ~kept] == 0)


def test_an_anchor_needs_a_target_and_the_weights_shape() -> None:
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="an anchor needs a target"):
        LayerProblem.build(torch.ones(2, 3), gram, anchor=torch.ones(2, 3))
    with pytest.raises(ValueError, match="an anchor needs a target and the weight's shape 2 x 3"):
        LayerProblem.build(torch.ones(2, 3), gram, target=torch.ones(2, 3), anchor=torch.ones(3, 3))
    with pytest.raises(ValueError, match="ridge must be >= 0 or None"):
        SparseLLMConfig(ridge=-1.0)


def test_a_huge_ridge_keeps_the_one_shot_weights_and_a_centred_damping_changes_the_solves() -> None:
    """ridge -> infinity pins every coordinated solve to the start; ridge = 0 (the damping moved from
    zero to W0) gives other weights than None."""
    dense, x = _mlp(), correlated_inputs(600, 16, seed=3)
    runs, weights = {}, {}
    for ridge in (None, 0.0, 1e9):
        model = copy.deepcopy(dense)
        runs[ridge] = sparsellm(ss.Chain.from_module(model), x, parse_pattern("0.7"), iterations=1, ridge=ridge,
                                refine="exact", reselect_mask=False)
        weights[ridge] = model[2].weight.detach().clone()
    assert runs[None].error < 0.9 * runs[None].start_error
    assert runs[1e9].history[0]["error"] == pytest.approx(runs[1e9].start_error, rel=1e-6)
    assert not torch.allclose(weights[None], weights[0.0], rtol=0, atol=1e-10)


def test_the_ridge_applies_below_its_sparsity_only() -> None:
    """``ridge_below``: a layer pruned at or above it runs as without the ridge, one below it as with
    it; the language-model defaults put the limit at 75 %."""
    lm = SparseLLMConfig.for_language_models()
    assert (lm.ridge_at(0.5), lm.ridge_at(0.7), lm.ridge_at(0.75), lm.ridge_at(0.9)) == (0.1, 0.1, None, None)
    assert SparseLLMConfig(ridge=0.1).ridge_at(0.9) == 0.1
    with pytest.raises(ValueError, match="ridge_below must be in"):
        SparseLLMConfig(ridge_below=0.0)
    dense, x = _mlp(), correlated_inputs(600, 16, seed=4)

    def run(pattern: str, **options: object) -> torch.Tensor:
        model = copy.deepcopy(dense)
        sparsellm(ss.Chain.from_module(model), x, parse_pattern(pattern), iterations=1, refine="exact", **options)
        return model[2].weight.detach().clone()

    for pattern, same_as in (("0.8", {"ridge": None}), ("0.6", {"ridge": 0.5})):
        limited = run(pattern, ridge=0.5, ridge_below=0.75)
        assert torch.equal(limited, run(pattern, **same_as)), pattern
    assert not torch.equal(run("0.8", ridge=0.5), run("0.8", ridge=None))  # the limit is what changed it


def test_held_out_windows_stay_out_of_every_fit_in_a_decoder() -> None:
    """Layer 0's attention is fitted on the other windows only: the same weights as a plain run on them."""
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    coordinator = SparseLLMConfig.for_language_models(heldout_fraction=0.25)
    model = tiny_model("llama", layers=2)
    result = prune_decoder(model, windows, PruneConfig("0.6", sparsellm=coordinator, batch_size=2), progress=False)
    held = torch.randperm(8, generator=torch.Generator().manual_seed(HELDOUT_SEED))[:2]
    fit = windows[[i for i in range(8) if i not in held.tolist()]]
    plain = tiny_model("llama", layers=2)
    prune_decoder(plain, fit, PruneConfig("0.6", batch_size=2), progress=False)
    attention = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(attention, name).weight, getattr(plain.model.layers[0].self_attn, name).weight)
    for record in result.layers:
        ffn = record.ffn
        assert ffn.heldout_relative_error is not None and ffn.start_heldout_relative_error is not None
        candidates = [ffn.start_heldout_relative_error, *ffn.iteration_heldout_errors]
        assert ffn.heldout_relative_error == candidates[ffn.best_iteration] == min(candidates)


def test_a_held_out_share_that_leaves_nothing_to_fit_is_refused() -> None:
    coordinator = SparseLLMConfig.for_language_models(heldout_fraction=0.9)
    windows = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="leaves none to fit"):
        prune_decoder(tiny_model("llama", layers=1), windows, PruneConfig("0.5", sparsellm=coordinator), progress=False)
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        SparseLLMConfig(heldout_fraction=1.0)
