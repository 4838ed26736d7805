"""Discovered adapters: tiny random-init models of families without an explicit adapter prune exactly,
reload with plain transformers, and sparsellm beats sparsegpt on their FFNs; MoE experts are pruned
on the tokens routed to them; what discovery does not understand is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsesolve as ss
from benchmarks.architecture_census import census_one, tiny_config
from sparsesolve.lm.adapters import get_adapter


@pytest.mark.parametrize("model_type", ["phi3", "gemma2", "gpt_neox", "falcon", "mixtral", "qwen2_moe"])
def test_families_prune_exactly_and_reload(model_type: str) -> None:
    row = census_one(model_type)  # exact 2:4 on every matrix, finite logits, same logits after a plain reload
    assert row["status"] == "ok", row["reason"]
    assert row["adapter"] == "DiscoveredAdapter"
    assert row["ffn_error_ratio"] < 1.0  # sparsellm's FFN (or expert) error below sparsegpt's


def _model(model_type: str, **settings: object) -> torch.nn.Module:
    config = tiny_config(model_type)
    for key, value in settings.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_fused_gate_up_is_split_into_halves_and_written_back() -> None:
    model = _model("phi3")
    lmap = get_adapter(model).layer_map(model, 0)
    assert [[lin.name for lin in group] for group in lmap.attention] == [
        ["model.layers.0.self_attn.qkv_proj"], ["model.layers.0.self_attn.o_proj"]]
    up, gate, down = lmap.ffn.linears
    assert (gate.rows, up.rows) == (slice(0, 128), slice(128, 256)) and gate.path == "model.layers.0.mlp.gate_up_proj"
    ids = torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    result = ss.prune(model, ids, method="sparsellm", pattern="2:4", progress=False)
    fused = model.model.layers[0].mlp.gate_up_proj.weight
    assert result.masks["model.layers.0.mlp.gate_up_proj"].shape == fused.shape
    assert bool((fused[~result.masks["model.layers.0.mlp.gate_up_proj"]] == 0).all())
    assert int((fused == 0).sum()) == fused.numel() // 2


def test_experts_are_pruned_on_their_routed_tokens_and_router_stays_dense() -> None:
    model = _model("mixtral")
    router = model.model.layers[0].mlp.gate.weight.clone()
    windows = torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    result = ss.prune(model, windows, method="sparsellm", pattern="2:4", progress=False)
    torch.testing.assert_close(model.model.layers[0].mlp.gate.weight, router)
    for record in result.layers:
        assert record.ffn is None and len(record.experts) == 4
        assert sum(e.tokens for e in record.experts) == windows.numel() * 2  # top-2 routing
        # experts with fewer routed tokens than their widest input (128) fall back to the layer-wise solver
        assert all(e.method == ("sparsellm" if e.tokens >= 128 else "sparsegpt") for e in record.experts)
    mask = result.masks["model.layers.0.mlp.experts.gate_up_proj"]
    assert mask.shape == (4, 256, 64) and int(mask.sum()) == mask.numel() // 2


def test_unknown_structures_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="activation quick_gelu has no exact equivalent"):
        get_adapter(_model("olmo", hidden_act="quick_gelu"))
    model = _model("olmo")
    model.model.layers[0].mlp.act_fn = torch.nn.Softplus()  # the config still says silu: the trace check catches it
    with pytest.raises(ValueError, match="is not B.act.A x.. or B.act.gate x. . up x. with activation silu"):
        get_adapter(model)


def test_an_moe_model_exports_with_its_experts_stored_as_they_are(tmp_path) -> None:
    from sparsesolve.deploy.export import export_compressed
    from sparsesolve.lm.compressed import load_compressed
    from sparsesolve.lm.output import OutputFolder

    model = _model("mixtral")
    result = ss.prune(model, torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(1)),
                      method="sparsegpt", pattern="2:4", progress=False)
    folder = OutputFolder(tmp_path / "pruned")
    folder.begin()
    folder.commit(model, None, result.masks, {})
    report = export_compressed(tmp_path / "pruned", tmp_path / "small")
    assert report["pruned_linears"] == 8  # q, k, v, o of both layers, packed
    assert report["pruned_parameters_stored_dense"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                        for p in ("down_proj", "gate_up_proj")]
    again = load_compressed(tmp_path / "small")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_half_precision_models_are_discovered_and_pruned(model_type: str, dtype: torch.dtype) -> None:
    # a half-precision trace is 0.05-0.4 % off its float64 chain: discovery must accept that rounding
    # (it refused every bfloat16 model) while still telling the structures apart
    model = _model(model_type).to(dtype)
    windows = torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    result = ss.prune(model, windows, method="sparsellm", pattern="2:4", progress=False)
    params = dict(model.named_parameters())
    assert len(result.masks) > 0
    for name, mask in result.masks.items():
        weight = params.get(f"{name}.weight", params.get(name))
        assert weight.dtype == dtype and bool(torch.isfinite(weight).all())
        assert bool((weight[~mask] == 0).all()) and int(mask.sum()) == mask.numel() // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_closest_activation_wins_not_the_first_within_tolerance(dtype: torch.dtype) -> None:
    # BLOOM's config names no activation, so every one is a candidate; with large pre-activations ReLU is
    # within bfloat16's tolerance of its tanh-GELU FFN (2-4 % off) and exact GELU within float32's
    model = _model("bloom")
    with torch.no_grad():
        model.transformer.h[0].mlp.dense_h_to_4h.weight.mul_(40.0)
    model = model.to(dtype)
    first = get_adapter(model).layer_map(model, 0).ffn.stages[0]
    assert first.activation.name == "gelu_tanh"
