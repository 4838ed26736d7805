"""SparseLLM on small MLPs: beats layer-wise SparseGPT end to end, its objective behaves as the maths
says, it never returns worse than its one-shot start, sparsity is exact, and chunking changes nothing."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import correlated_inputs
from torch import nn

import sparsesolve as ss
from sparsesolve.core.patterns import parse_pattern


def relu_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 16)).double()


def gated_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(ss.GatedMLP(16, 48)).double()


def model_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - dense(x)) ** 2).sum())


@pytest.mark.parametrize("build", [relu_mlp, gated_mlp], ids=["relu3", "gated"])
@pytest.mark.parametrize("pattern", ["0.7", "0.8", "0.9", "2:4"])
def test_sparsellm_beats_layerwise_sparsegpt(build: object, pattern: str) -> None:
    for seed in range(3):
        dense = build(seed)
        x = correlated_inputs(768, 16, seed=seed)
        by_sparsegpt, by_sparsellm = copy.deepcopy(dense), copy.deepcopy(dense)
        baseline = ss.prune(by_sparsegpt, x, method="sparsegpt", pattern=pattern)
        result = ss.prune(by_sparsellm, x, method="sparsellm", pattern=pattern, iterations=4)
        # the start is the layer-wise SparseGPT solution; the result is measured on the model itself
        assert result.start_error == pytest.approx(baseline.error, rel=1e-9)
        assert model_error(by_sparsellm, dense, x) == pytest.approx(result.error, rel=1e-6)
        assert result.error < 0.95 * baseline.error, (seed, result.error, baseline.error)
        assert len(result.history) == 4
        chosen = parse_pattern(pattern)
        for lin in ss.Chain.from_module(by_sparsellm).linears:
            solution = result.solutions[lin.name]
            chosen.check_mask(solution.mask)
            assert not bool(lin.weight[~solution.mask].any())


@pytest.mark.parametrize("build", [relu_mlp, gated_mlp], ids=["relu3", "gated"])
@pytest.mark.parametrize("options", [{"prox": "local"}, {"refine": "none"}, {"refine": "exact"}, {"refine_iter": 2}],
                         ids=["local-prox", "no-refit", "exact-refit", "two-cg-steps"])
def test_faster_variants_still_beat_sparsegpt(build: object, options: dict) -> None:
    dense, x = build(1), correlated_inputs(768, 16, seed=1)
    pruned = copy.deepcopy(dense)
    baseline = ss.prune(copy.deepcopy(dense), x, method="sparsegpt", pattern="0.8")
    result = ss.prune(pruned, x, method="sparsellm", pattern="0.8", iterations=4, **options)
    assert model_error(pruned, dense, x) == pytest.approx(result.error, rel=1e-6)
    assert result.error < 0.95 * baseline.error
    for lin in ss.Chain.from_module(pruned).linears:
        parse_pattern("0.8").check_mask(result.solutions[lin.name].mask)
        assert not bool(lin.weight[~result.solutions[lin.name].mask].any())


@pytest.mark.parametrize("build", [relu_mlp, gated_mlp], ids=["relu3", "gated"])
def test_objective_trace_non_increasing_over_auxiliary_updates(build: object) -> None:
    model, x = build(3), correlated_inputs(512, 16, seed=3)
    result = ss.prune(model, x, method="sparsellm", pattern="0.8", iterations=3)
    for record in result.history:
        values = [value for _, value in record["objective_trace"]]
        assert record["objective_trace"][0][0] == "weights"
        assert all(b <= a * (1 + 1e-10) for a, b in zip(values, values[1:])), values


def test_fixed_masks_keep_the_one_shot_masks_and_descend_on_the_auxiliaries() -> None:
    """With fixed masks every linear keeps its SparseGPT mask; each auxiliary block update (exact
    minimisers with ``prox="global"`` on ReLU) never increases F, and the result beats the start."""
    dense, x = relu_mlp(4), correlated_inputs(512, 16, seed=4)
    baseline = ss.prune(copy.deepcopy(dense), x, method="sparsegpt", pattern="2:4")
    result = ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="2:4", iterations=4, reselect_mask=False,
                      refine="exact")
    for name, solution in result.solutions.items():
        assert torch.equal(solution.mask, baseline.solutions[name].mask), name
    for record in result.history:
        values = [value for _, value in record["objective_trace"]]
        assert all(b <= a * (1 + 1e-10) for a, b in zip(values, values[1:])), values
    assert result.error < result.start_error


def test_never_worse_than_the_one_shot_start() -> None:
    """Penalties far off balance make the coordinator's iterates poor; keep-best returns the start."""
    model, x = relu_mlp(5), correlated_inputs(256, 16, seed=5)
    result = ss.prune(model, x, method="sparsellm", sparsity=0.9, iterations=3, alpha=1e-4, beta=1e-4, gamma=1e4)
    assert result.error <= result.start_error
    assert all(result.error <= record["error"] for record in result.history)
    if result.best_iteration == 0:
        assert result.error == result.start_error


@pytest.mark.parametrize("build", [relu_mlp, gated_mlp], ids=["relu3", "gated"])
def test_chunked_and_unchunked_runs_agree(build: object) -> None:
    dense, x = build(6), correlated_inputs(300, 16, seed=6)
    whole, chunked = copy.deepcopy(dense), copy.deepcopy(dense)
    # the exact refit: conjugate gradients stop on a tolerance, so summation order could move their stopping step
    a = ss.prune(whole, x, method="sparsellm", pattern="0.7", iterations=2, refine="exact")
    b = ss.prune(chunked, x, method="sparsellm", pattern="0.7", iterations=2, chunk_size=37, refine="exact")
    assert a.error == pytest.approx(b.error, rel=1e-8)
    for p, q in zip(whole.parameters(), chunked.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_layerwise_methods_prune_in_place(method: str) -> None:
    dense, x = relu_mlp(7), correlated_inputs(256, 16, seed=7)
    model = copy.deepcopy(dense)
    result = ss.prune(model, x, method=method, sparsity=0.6)
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    assert model_error(model, dense, x) == pytest.approx(result.error, rel=1e-6)
    assert set(result.solutions) == {"0", "2", "4"}


def test_float32_model_and_inner_admm_solver() -> None:
    model, x = relu_mlp(8).float(), correlated_inputs(256, 16, seed=8).float()
    result = ss.prune(model, x, method="sparsellm", pattern="2:4", iterations=2, solver="admm")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert result.error <= result.start_error


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "obs", "sparsity": 0.5}, "unknown method"),
        ({"sparsity": 0.5, "pattern": "2:4"}, "exactly one"),
        ({}, "exactly one"),
        ({"sparsity": 1.0}, "sparsity must be in"),
        ({"pattern": "3:2"}, "n < m"),
        ({"pattern": "2:5"}, "multiple of 5"),
        ({"sparsity": 0.5, "iterations": -1}, "iterations"),
        ({"sparsity": 0.5, "gamma": 0.0}, "penalties"),
        ({"sparsity": 0.5, "method": "wanda", "iterations": 2}, "apply to method .sparsellm. only"),
        ({"sparsity": 0.5, "chunk_size": 0}, "chunk_size"),
        ({"sparsity": 0.5, "prox": "exact"}, "prox must be"),
        ({"sparsity": 0.5, "refine": "lsqr"}, "refine must be one of"),
        ({"sparsity": 0.5, "reselect_mask": False, "refine": "none"}, "keeps the masks"),
        ({"sparsity": 0.5, "preactivations": "drop"}, "preactivations must be one of"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ss.prune(relu_mlp(0), correlated_inputs(64, 16, seed=0), **kwargs)


@pytest.mark.parametrize(
    ("model", "calibration", "message"),
    [
        (nn.Sequential(nn.ReLU(), nn.Linear(16, 4)), torch.randn(8, 16), "must directly follow"),
        (nn.Sequential(nn.Linear(16, 4), nn.LayerNorm(4)), torch.randn(8, 16), "unsupported module"),
        (nn.Sequential(nn.Linear(16, 4)), torch.randn(8, 15), "N x 16"),
        (nn.Sequential(nn.Linear(16, 4)), torch.randn(0, 16), "no calibration tokens"),
        (nn.Sequential(nn.Linear(16, 4)), torch.full((8, 16), float("nan")), "NaN"),
        (nn.Sequential(), torch.randn(8, 16), "at least one linear"),
    ],
)
def test_bad_models_and_calibration(model: nn.Module, calibration: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ss.prune(model, calibration, sparsity=0.5)


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
@pytest.mark.parametrize("build", [relu_mlp, gated_mlp], ids=["relu3", "gated"])
def test_token_weights_count_like_repeated_tokens(method: str, build: object) -> None:
    """A token of weight sqrt(k) must give exactly what k copies of it give (Grams, targets, errors)."""
    from sparsesolve.core.chain import Chain
    from sparsesolve.core.config import PruneConfig
    from sparsesolve.core.coordinator import prune_chain

    x = correlated_inputs(400, 16, seed=3)
    copies = torch.randint(1, 4, (400,), generator=torch.Generator().manual_seed(0))
    weighted, repeated = build(1), build(1)
    config = PruneConfig("0.6", method=method)
    with torch.no_grad():
        a = prune_chain(Chain.from_module(weighted), x, config, token_weights=copies.double().sqrt())
        b = prune_chain(Chain.from_module(repeated), x.repeat_interleave(copies, dim=0), config)
    assert a.relative_error == pytest.approx(b.relative_error, rel=1e-6)
    assert a.start_error == pytest.approx(b.start_error, rel=1e-6)
    for p, q in zip(weighted.parameters(), repeated.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("build", [relu_mlp, gated_mlp], ids=["relu3", "gated"])
def test_lending_the_last_activation_to_the_passes_changes_no_iterate(build: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The passes write their activations before the output linear into the auxiliary ``a_{L-2}``
    (one ``N x d_ff`` array less); the weights, errors and history are those of separate storage."""
    from sparsesolve.core.coordinator import CoordinatorState

    dense, x = build(7), correlated_inputs(400, 16, seed=7)
    lent = ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="0.7", iterations=3, trace=False)
    monkeypatch.setattr(CoordinatorState, "lendable", property(lambda self: None))
    separate = ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="0.7", iterations=3, trace=False)
    assert lent.error == separate.error and lent.start_error == separate.start_error
    assert [h["error"] for h in lent.history] == [h["error"] for h in separate.history]
    for name, solution in lent.solutions.items():
        assert torch.equal(solution.weight, separate.solutions[name].weight), name


@pytest.mark.parametrize("build", [relu_mlp, gated_mlp], ids=["relu3", "gated"])
def test_preactivations_recomputed_after_the_start_and_released_in_the_last_pass_change_no_iterate(
        build: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``preactivations="recompute"`` (the default off the CPU) the dense pre-activations are not
    held through the one-shot start but computed again after it, and the last pass releases each once
    its cross-covariance is taken and allocates its activation only then: the weights, errors and
    objective trace are bit-identical to keeping them, and neither the start nor the end of the last
    pass holds any."""
    from sparsesolve.core import coordinator

    dense, x = build(12), correlated_inputs(400, 16, seed=12)
    kept = ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="0.7", iterations=3, trace=True)
    states, held = [], []
    original_init, original_start, original_pass = (coordinator.CoordinatorState.__init__, coordinator.layerwise,
                                                    coordinator.sequential_pass)

    def init(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        states.append(self)

    def holding(phase: str, run: object) -> object:
        def call(*args, **kwargs) -> object:
            out = run(*args, **kwargs)
            held.append((phase, sum(p is not None for ps in states[-1].pres for p in ps)))
            return out
        return call

    original_lend = coordinator.CoordinatorState._lend

    def lend(self) -> torch.Tensor:
        held.append(("lend", sum(p is not None for ps in self.pres for p in ps), self.acts[-1] is None))
        return original_lend(self)

    monkeypatch.setattr(coordinator.CoordinatorState, "__init__", init)
    monkeypatch.setattr(coordinator.CoordinatorState, "_lend", lend)
    monkeypatch.setattr(coordinator, "layerwise", holding("start", original_start))
    monkeypatch.setattr(coordinator, "sequential_pass", holding("pass", original_pass))
    lean = ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="0.7", iterations=3, trace=True,
                    preactivations="recompute")
    stored = sum(len(stage.linears) for stage in ss.Chain.from_module(dense).stages[:-1])
    # the last pass allocates its activation anew, after its pre-activations are gone
    assert held == [("lend", 0, False), ("start", 0), ("lend", stored, False), ("pass", stored),
                    ("lend", stored, False), ("pass", stored), ("lend", 0, True), ("pass", 0)]
    assert lean.error == kept.error and lean.start_error == kept.start_error
    assert [h["objective_trace"] for h in lean.history] == [h["objective_trace"] for h in kept.history]
    for name, solution in lean.solutions.items():
        assert torch.equal(solution.weight, kept.solutions[name].weight), name


@pytest.mark.parametrize("preactivations", ["keep", "recompute"])
@pytest.mark.parametrize("kind", ["relu", "gated", "relu3"])
def test_the_last_iteration_of_an_ffn_runs_in_one_sweep_that_stores_no_auxiliary_and_changes_no_iterate(
        kind: str, preactivations: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the objective trace, the last iteration of a two-stage chain updates the auxiliaries and
    takes the first stage's cross-covariances in one sweep (``fused_updates``): float32 chain with
    biases, bfloat16 auxiliaries, token weights, two iterations. The weights, errors and escalations are
    those of the stored updates (forced here by the trace); nothing holds the auxiliary activation
    while the sweep runs, nothing is stored when the last pass asks for its activation, and the
    sweep's cross-covariances are gone by the time the output linear is solved. A three-stage chain
    keeps the stored updates."""
    import weakref

    from sparsesolve.core import coordinator

    torch.manual_seed(3)
    module = {"relu": lambda: nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16)),
              "gated": lambda: nn.Sequential(ss.GatedMLP(16, 48)),
              "relu3": lambda: nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                                             nn.Linear(32, 16))}[kind]()
    for linear in (m for m in module.modules() if isinstance(m, nn.Linear) and m.bias is not None):
        nn.init.normal_(linear.bias, std=0.3)
    x = correlated_inputs(400, 16, seed=13).float()
    token_weights = torch.rand(400, generator=torch.Generator().manual_seed(4)) + 0.5
    runs, lent, sweeps, crosses, alive_at_output = {}, [], [], [], []
    original_lend, original_fused = coordinator.CoordinatorState._lend, coordinator.CoordinatorState.fused_updates
    original_cross = coordinator.CoordinatorState.cross

    def lend(self) -> torch.Tensor:
        lent.append((sum(p is not None for ps in self.pres for p in ps), sum(a is not None for a in self.acts)))
        return original_lend(self)

    def fused_updates(self, *args, **kwargs) -> object:
        sweeps.append((trace, sum(a is not None for a in self.acts)))
        out, escalations = original_fused(self, *args, **kwargs)
        crosses.extend(weakref.ref(c) for c in out)
        return out, escalations

    def cross(self, target, linear, acts) -> torch.Tensor:
        alive_at_output.append(sum(ref() is not None for ref in crosses))
        return original_cross(self, target, linear, acts)

    monkeypatch.setattr(coordinator.CoordinatorState, "_lend", lend)
    monkeypatch.setattr(coordinator.CoordinatorState, "fused_updates", fused_updates)
    monkeypatch.setattr(coordinator.CoordinatorState, "cross", cross)
    for trace in (True, False):
        lent.clear()
        alive_at_output.clear()
        runs[trace] = coordinator.sparsellm(ss.Chain.from_module(copy.deepcopy(module)), x, parse_pattern("0.6"),
                                            iterations=2, alpha=0.1, prox="local", aux_dtype="bfloat16", trace=trace,
                                            preactivations=preactivations, token_weights=token_weights)
        if not trace and kind != "relu3":
            # the first pass's lending holds the pre-activations; the last pass's, nothing
            assert lent[-1] == (0, 0) and lent[1][0] == (2 if kind == "gated" else 1)
            assert alive_at_output[-1] == 0     # the output linear's cross: the sweep's are freed
    # once, in the last iteration without the trace, with the auxiliary activation already released
    assert sweeps == ([] if kind == "relu3" else [(False, 0)])
    stored, fused = runs[True], runs[False]
    assert fused.error == stored.error and fused.start_error == stored.start_error
    assert [h["ridge_escalations"] for h in fused.history] == [h["ridge_escalations"] for h in stored.history]
    for name, solution in fused.solutions.items():
        assert torch.equal(solution.weight, stored.solutions[name].weight), name


@pytest.mark.parametrize("preactivations", ["keep", "recompute"])
def test_the_sweep_in_chunks_that_do_not_align_matches_the_stored_updates(preactivations: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In float64, with 64-token chunks and update chunks of 5 tokens (which do not divide 64), the sweep
    and the stored updates sum the cross-covariances over different chunks: the results agree to
    rounding."""
    from sparsesolve.core import coordinator

    monkeypatch.setattr(coordinator, "UPDATE_BLOCK", 5 * 48)
    dense, x = gated_mlp(5), correlated_inputs(400, 16, seed=5)
    runs = {trace: coordinator.sparsellm(ss.Chain.from_module(copy.deepcopy(dense)), x, parse_pattern("2:4"), iterations=1,
                                         alpha=0.1, prox="local", trace=trace, chunk_size=64, preactivations=preactivations)
            for trace in (True, False)}
    assert runs[False].error == pytest.approx(runs[True].error, rel=1e-9)
    for name, solution in runs[False].solutions.items():
        assert torch.equal(solution.mask, runs[True].solutions[name].mask), name
        torch.testing.assert_close(solution.weight, runs[True].solutions[name].weight, rtol=1e-9, atol=1e-12)


def test_the_preactivations_option_decides_by_device_only_when_auto() -> None:
    from sparsesolve.core.coordinator import recompute_preactivations

    assert not recompute_preactivations("cpu") and recompute_preactivations("cuda")
    assert recompute_preactivations("cpu", "recompute") and not recompute_preactivations("cuda", "keep")
    with pytest.raises(ValueError, match="preactivations must be one of auto, keep, recompute"):
        recompute_preactivations("cpu", "drop")


def test_a_pass_writes_the_last_input_where_it_is_told() -> None:
    """``layerwise(last_input=buffer)``: the buffer ends holding the pruned activations before the
    output linear (the chain's forward with the returned weights)."""
    from sparsesolve.core.sequential import layerwise

    model, x = relu_mlp(8), correlated_inputs(200, 16, seed=8)
    chain = ss.Chain.from_module(model)
    target = chain.forward(x)
    buffer = torch.full((200, 48), float("nan"), dtype=torch.float64)
    result = layerwise(chain, x, parse_pattern("0.5"), "sparsegpt", target, dtype=torch.float64,
                       storage_dtype=torch.float64, last_input=buffer)
    a = x
    for stage, ws in zip(chain.stages[:-1], result.weights[:-1]):
        a = stage.activate([a @ w.T + lin.bias for lin, w in zip(stage.linears, ws)])
    torch.testing.assert_close(buffer, a)


def test_elementwise_updates_in_small_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The auxiliary updates run in chunks of at most ``UPDATE_BLOCK`` values whatever ``chunk_size``
    (their temporaries stay small); a block of a few rows changes nothing but summation order."""
    from sparsesolve.core import coordinator

    dense, x = gated_mlp(9), correlated_inputs(300, 16, seed=9)
    wide = ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="0.7", iterations=2, refine="exact")
    monkeypatch.setattr(coordinator, "UPDATE_BLOCK", 5 * 48 + 7)  # 5 rows of the 48-wide FFN
    state = coordinator.CoordinatorState(ss.Chain.from_module(copy.deepcopy(dense)), x, torch.float64, torch.float64,
                                         None, 1.0, 1.0, 1.0)
    assert (state.update_chunk(48), state.update_chunk(10**6)) == (5, 1)
    narrow = ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="0.7", iterations=2, refine="exact")
    assert narrow.error == pytest.approx(wide.error, rel=1e-9)
    assert [h["error"] for h in narrow.history] == pytest.approx([h["error"] for h in wide.history], rel=1e-9)


def test_bfloat16_auxiliaries_of_a_float32_chain_halve_their_storage_not_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """``aux_dtype="bfloat16"``: a float32 chain's auxiliaries are stored in bfloat16, the dense target
    is still the float32 forward (``reference`` unchanged), and the pruned FFN's true error stays
    within 1 % of float32 storage; a float64 chain keeps float64 (bit-identical results)."""
    from sparsesolve.core.coordinator import CoordinatorState

    stored = []
    original = CoordinatorState.__init__

    def spy(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        stored.append({a.dtype for a in [*self.acts, *(p for ps in self.pres for p in ps)]})

    monkeypatch.setattr(CoordinatorState, "__init__", spy)
    dense64, x64 = gated_mlp(11), correlated_inputs(600, 16, seed=11)
    dense, x = copy.deepcopy(dense64).float(), x64.float()
    runs = {aux: ss.prune(copy.deepcopy(dense), x, method="sparsellm", pattern="0.7", iterations=1, refine="cg",
                          aux_dtype=aux) for aux in ("inherit", "bfloat16")}
    assert stored == [{torch.float32}, {torch.bfloat16}]
    assert runs["bfloat16"].reference == runs["inherit"].reference
    assert runs["bfloat16"].error == pytest.approx(runs["inherit"].error, rel=0.01)
    wide = {aux: ss.prune(copy.deepcopy(dense64), x64, method="sparsellm", pattern="0.7", iterations=1, aux_dtype=aux)
            for aux in ("inherit", "bfloat16")}
    assert stored[2:] == [{torch.float64}, {torch.float64}] and wide["bfloat16"].error == wide["inherit"].error


def test_a_bfloat16_chains_candidates_are_held_in_bfloat16_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidates' weights (the one-shot start's and each pass's) stay in the model's dtype and
    share storage with their solutions: no float32 copies (``4 d f`` bytes per linear at a peak), and
    the pruned weights and errors are bit-identical to holding float32 copies of the same values."""
    import sparsesolve.core.coordinator as coordinator
    import sparsesolve.core.sequential as sequential

    original, held = sequential.sequential_pass, []

    def spy(*args, upcast: bool = False, **kwargs):
        result = original(*args, **kwargs)
        held.extend((w.dtype, w.data_ptr() == result.solutions[lin.name].weight.data_ptr())
                    for stage, ws in zip(args[0].stages, result.weights) for lin, w in zip(stage.linears, ws))
        if upcast:  # what the candidates held before: float32 copies
            result.weights = [[w.float() for w in ws] for ws in result.weights]
        return result

    dense, x = gated_mlp(5).bfloat16(), correlated_inputs(600, 16, seed=5).bfloat16()
    runs = {}
    for upcast in (False, True):
        patched = functools.partial(spy, upcast=upcast)
        monkeypatch.setattr(sequential, "sequential_pass", patched)
        monkeypatch.setattr(coordinator, "sequential_pass", patched)
        model = copy.deepcopy(dense)
        runs[upcast] = (ss.prune(model, x, method="sparsellm", pattern="2:4", iterations=2, refine="cg", trust=0.3,
                                    ridge=0.1), model)
    assert held and all(entry == (torch.bfloat16, True) for entry in held)
    (kept, kept_model), (copies, copies_model) = runs[False], runs[True]
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in run.history] for run in (kept, copies)]
    assert kept.error == copies.error and untimed[0] == untimed[1] and kept.best_iteration == copies.best_iteration
    assert all(torch.equal(a, b) for a, b in zip(kept_model.state_dict().values(), copies_model.state_dict().values()))


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_per_linear_patterns_prune_each_linear_to_its_own_and_one_for_all_changes_nothing(
        method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsesolve.core.chain import Chain
    from sparsesolve.core.config import PruneConfig
    from sparsesolve.core.coordinator import prune_chain
    from sparsesolve.core.patterns import Unstructured
    from sparsesolve.core.solvers import LayerProblem

    x = correlated_inputs(400, 16, seed=4)
    config = PruneConfig("0.7", method=method)
    names = [lin.name for lin in Chain.from_module(gated_mlp(2)).linears]
    same, mapped = gated_mlp(2), gated_mlp(2)
    with torch.no_grad():
        a = prune_chain(Chain.from_module(same), x, config, language_model=True)
        b = prune_chain(Chain.from_module(mapped), x, config, language_model=True,
                        patterns={name: config.pattern for name in names})
    assert a.error == b.error and a.start_error == b.start_error
    for p, q in zip(same.parameters(), mapped.parameters()):
        assert torch.equal(p, q)
    # its own sparsity per linear; the ridge (default 0.1 below 0.75) in force per linear, by its own sparsity
    own = dict(zip(names, (Unstructured(0.5), Unstructured(0.8), Unstructured(0.6))))
    damps: list[float] = []
    build = LayerProblem.build.__func__

    def spy(cls: type, weight: torch.Tensor, gram: torch.Tensor, **kwargs: object) -> LayerProblem:
        if kwargs.get("target") is not None:        # the coordinated solves (the start's have no target)
            damps.append(float(kwargs["damp"]))
        return build(cls, weight, gram, **kwargs)

    monkeypatch.setattr(LayerProblem, "build", classmethod(spy))
    model = gated_mlp(2)
    with torch.no_grad():
        result = prune_chain(Chain.from_module(model), x, config, language_model=True, patterns=own)
    for name in names:
        own[name].check_mask(result.solutions[name].mask)
    if method == "sparsellm":
        assert damps == pytest.approx([0.11, 0.01, 0.11]) and result.error <= result.start_error
