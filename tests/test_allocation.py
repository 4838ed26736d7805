"""Layer-wise sparsity allocation: exact averages, OWL's ordering, the OBS and Fisher curves against an
exact refit, the Fisher row weights against autograd, optimality of the Lagrangian split, whole
decoders pruned under each allocation, and the per-linear unit (its curves summing to the layer's)."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import VOCAB, tiny_model

from sparsesolve.core.config import COORDINATED_FFN_SCALE, PruneConfig
from sparsesolve.core.solvers import refit
from sparsesolve.lm.adapters import get_adapter
from sparsesolve.lm.allocation import GRID_STEP, LayerStatistics, _statistics, allocate, layer_statistics, sparsity_grid
from sparsesolve.lm.decoder import prune_decoder
from sparsesolve.lm.fisher import output_fisher
from sparsesolve.lm.layer_inputs import capture_first_inputs


def _stats(params: list[int], outliers: list[float], slopes: list[float], target: float = 0.7,
           spread: float = 0.08) -> dict[int, LayerStatistics]:
    """Layers with convex error curves ``slope * (s - 0.5)^2`` on the allocation grid."""
    grid = sparsity_grid(target, spread)
    return {i: LayerStatistics(p, o, grid, k * (grid - 0.5) ** 2) for i, (p, o, k) in enumerate(zip(params, outliers, slopes))}


def _average(sparsity: dict[int, float], stats: dict[int, LayerStatistics]) -> float:
    return sum(sparsity[i] * s.params for i, s in stats.items()) / sum(s.params for s in stats.values())


@pytest.mark.parametrize("kind", ["uniform", "owl", "obs", "fisher"])
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


@pytest.mark.parametrize("weighted", [False, True])
def test_one_zero_per_row_costs_what_an_exact_refit_of_each_row_costs(weighted: bool) -> None:
    """At the grid point of one zero per row the curve is the sum over rows of each row's smallest
    ``w^2 / [Hd^-1]_jj``; pruning exactly that weight and refitting the row costs the same. ``"obs"``
    divides the sum by ``||W X||^2``, ``"fisher"`` weighs row ``i`` by its ``f_i``."""
    torch.manual_seed(0)
    n = 8
    linear = torch.nn.Linear(n, 3, bias=False).double()
    x = torch.randn(50, n, dtype=torch.float64)
    gram = x.T @ x

    class Lin:
        module, index, name = linear, None, "lin"
        weight = linear.weight.detach()

    f = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    grid = torch.tensor([0.0, 1 / n])
    stats = _statistics([Lin()], {id(linear): gram}, grid, damp=0.0, params=3 * n, row_weights={"lin": f} if weighted else None)
    w = Lin.weight
    saliency = w**2 / torch.diagonal(torch.linalg.inv(gram))
    mask = saliency > saliency.min(dim=1, keepdim=True).values       # each row loses its cheapest weight
    rows = [refit(w[i : i + 1], gram, mask[i : i + 1], damp=0.0) for i in range(3)]
    whole = refit(w, gram, mask, damp=0.0)
    expected = sum(float(fi) * r.error for fi, r in zip(f, rows)) if weighted else whole.error / whole.reference
    assert stats.errors[0] == 0
    assert float(stats.errors[1]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fisher_weights_are_the_mean_squared_loss_gradient_of_every_output_row(family: str) -> None:
    """Against autograd on the linears' outputs, for one batch of all windows (the reference) and
    batches of three (accumulated by the hooks); the model's parameters keep their requires_grad."""
    model = tiny_model(family, layers=2)
    windows = torch.randint(0, VOCAB, (7, 16), generator=torch.Generator().manual_seed(1))
    adapter = get_adapter(model)
    linears = [lin for i in (0, 1) for lin in adapter.layer_map(model, i).linears]
    fisher = output_fisher(model, adapter, [0, 1], windows, batch_size=3)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    outputs = {}
    handles = [lin.module.register_forward_hook(lambda m, a, out: outputs.__setitem__(id(m), out)) for lin in linears]
    logits = model(input_ids=windows).logits
    for handle in handles:
        handle.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    modules = list(outputs)
    grads = dict(zip(modules, torch.autograd.grad(loss, [outputs[k] for k in modules])))
    assert sorted(fisher) == sorted(lin.name for lin in linears)
    for lin in linears:
        g = grads[id(lin.module)].reshape(-1, grads[id(lin.module)].shape[-1])
        expected = g.double().pow(2).mean(dim=0)
        expected = expected if lin.rows is None else expected[lin.rows]
        assert fisher[lin.name].shape == (lin.weight.shape[0],)
        torch.testing.assert_close(fisher[lin.name], expected, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("kind", ["owl", "obs", "fisher"])
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


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_a_per_linear_allocation_gives_each_linear_its_own_sparsity_and_keeps_the_average(method: str) -> None:
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", layers=3)
    names = {lin.name: lin.weight.numel() for i in range(3) for lin in get_adapter(model).layer_map(model, i).linears}
    result = prune_decoder(model, windows, PruneConfig("0.6", method=method, allocation="fisher", allocation_range=0.1,
                                                       allocation_unit="linear"), progress=False)
    assert set(result.allocation) == set(names)
    requested = sum(result.allocation[n] * p for n, p in names.items()) / sum(names.values())
    assert requested == pytest.approx(0.6, abs=1e-12)
    assert all(0.5 - 1e-12 <= s <= 0.7 + 1e-12 for s in result.allocation.values())
    for i in range(3):      # the linears of one layer differ: a per-layer allocation could not give these
        assert len({round(result.allocation[lin.name], 6) for lin in get_adapter(model).layer_map(model, i).linears}) > 1
    for name, mask in result.masks.items():     # each row rounds its own zeros
        assert abs(float((~mask).sum()) / mask.numel() - result.allocation[name]) <= 0.5 / mask.shape[1] + 1e-12


def test_a_layers_error_curve_is_the_sum_of_its_linears_curves() -> None:
    windows = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama", layers=2)
    adapter, grid = get_adapter(model), sparsity_grid(0.6, 0.1)
    fisher = output_fisher(model, adapter, [0, 1], windows, 4)
    curves = {}
    for unit in ("layer", "linear"):
        inputs = capture_first_inputs(model, adapter.layers(model)[0], windows, 4, torch.float32, torch.device("cpu"))
        curves[unit] = layer_statistics(model, adapter, [0, 1], inputs, torch.float32, torch.device("cpu"), grid,
                                        row_weights=fisher, unit=unit)
    assert set(curves["layer"]) == {0, 1}
    for i in (0, 1):
        linears = adapter.layer_map(model, i).linears
        summed = sum(curves["linear"][lin.name].errors for lin in linears)
        torch.testing.assert_close(curves["layer"][i].errors, summed, rtol=1e-12, atol=0)
        assert curves["layer"][i].params == sum(curves["linear"][lin.name].params for lin in linears)


def test_a_per_linear_allocation_refuses_moe_experts() -> None:
    from transformers import AutoModelForCausalLM

    from benchmarks.architecture_census import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("mixtral")).eval()
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="allocation_unit 'linear' .* MoE experts"):
        prune_decoder(model, windows, PruneConfig("0.6", method="sparsegpt", allocation="owl", allocation_unit="linear"),
                      progress=False)
    with pytest.raises(ValueError, match="allocation_unit: must be one of layer, linear"):
        PruneConfig("0.6", allocation="owl", allocation_unit="expert")
    with pytest.raises(ValueError, match="allocation_unit: 'linear' splits an allocation's zeros"):
        PruneConfig("0.6", allocation_unit="linear")


def test_the_ffn_scale_moves_zeros_into_the_ffn_and_keeps_the_average() -> None:
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    adapter = get_adapter(tiny_model("llama", layers=2))
    ffn_share = {}
    for scale in (1.0, 0.25):
        model = tiny_model("llama", layers=2)
        maps = [adapter.layer_map(model, i) for i in range(2)]
        result = prune_decoder(model, windows, PruneConfig("0.6", method="sparsegpt", allocation="fisher", allocation_range=0.1,
                                                           allocation_unit="linear", allocation_ffn_scale=scale), progress=False)
        params = {lin.name: lin.weight.numel() for m in maps for lin in m.linears}
        ffn = [lin.name for m in maps for lin in m.ffn.linears]
        assert sum(result.allocation[n] * p for n, p in params.items()) / sum(params.values()) == pytest.approx(0.6, abs=1e-12)
        ffn_share[scale] = sum(result.allocation[n] * params[n] for n in ffn) / sum(params[n] for n in ffn)
    assert ffn_share[0.25] > ffn_share[1.0] + 0.005      # 0.599 against 0.588 here; without the scale equal


def test_the_ffn_scale_needs_the_fisher_allocation_and_defaults_to_the_coordinators_share() -> None:
    assert PruneConfig("0.6", method="sparsellm", allocation="fisher").allocation_ffn_scale == COORDINATED_FFN_SCALE < 1
    for method, allocation in (("sparsegpt", "fisher"), ("sparsellm", "owl"), ("sparsellm", "uniform")):
        assert PruneConfig("0.6", method=method, allocation=allocation).allocation_ffn_scale == 1.0
    with pytest.raises(ValueError, match="allocation_ffn_scale: scales the fisher allocation's FFN curves; allocation 'owl'"):
        PruneConfig("0.6", allocation="owl", allocation_ffn_scale=0.5)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="allocation_ffn_scale: must be a finite number > 0"):
            PruneConfig("0.6", allocation="fisher", allocation_ffn_scale=bad)
