"""Layer-by-layer pruning of tiny random-init language models of every supported family."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from tiny_lm import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, BertConfig

import sparsesolve as ss
from benchmarks.architecture_census import tiny_config
from sparsesolve.core.config import PruneConfig, SparseLLMConfig
from sparsesolve.core.patterns import Unstructured, parse_pattern
from sparsesolve.lm.adapters import get_adapter
from sparsesolve.lm.decoder import prune_decoder, select_layers
from sparsesolve.lm.output import OutputFolder

FAMILIES = ("llama", "opt", "gpt2")


def calibration(n: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """Random token windows (random-init models do not care about real text)."""
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def all_linears(model: torch.nn.Module) -> list:
    adapter = get_adapter(model)
    return [lin for i in range(len(adapter.layers(model))) for lin in adapter.layer_map(model, i).linears]


def dense_ffn(family: str, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The FFN output of a decoder layer computed by the model's own modules."""
    if family == "opt":
        return layer.fc2(layer.activation_fn(layer.fc1(x)))
    return layer.mlp(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_chain_reproduces_the_model_ffn(family: str) -> None:
    model = tiny_model(family)
    lmap = get_adapter(model).layer_map(model, 1)
    x = torch.randn(50, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(lmap.ffn.forward(x), dense_ffn(family, get_adapter(model).layers(model)[1], x))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ss.METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "0.6"])
def test_every_method_gives_exact_sparsity_and_finite_logits(family: str, method: str, pattern: str) -> None:
    model = tiny_model(family)
    result = ss.prune(model, calibration(), method=method, pattern=pattern, progress=False)
    chosen = parse_pattern(pattern)
    for lin in all_linears(model):
        weight, mask = lin.weight, result.masks[lin.name]
        chosen.check_mask(mask)
        assert int((~mask).sum()) == chosen.n_zeros(tuple(weight.shape)), lin.name
        assert bool((weight[~mask] == 0).all()), f"{lin.name} has weights off its mask"
    assert result.sparsity == pytest.approx(chosen.sparsity, abs=0.01)
    assert result.escalations == 0
    with torch.no_grad():
        assert torch.isfinite(model(calibration(2, 16, seed=5)).logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_reloads_with_plain_transformers(family: str, tmp_path) -> None:
    model = tiny_model(family)
    result = prune_decoder(model, calibration(), PruneConfig("2:4", method="sparsegpt"), progress=False)
    path = OutputFolder(tmp_path / "out").commit(model, None, result.masks, {"sparsity": result.sparsity})
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = calibration(2, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "masks.safetensors",
                                                      "model.safetensors", "report.json"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsellm_reconstructs_the_ffn_better_than_sparsegpt(family: str) -> None:
    windows = calibration(16, 32)
    errors = {}
    for method in ("sparsegpt", "sparsellm"):
        result = prune_decoder(tiny_model(family), windows, PruneConfig("0.7", method=method), progress=False)
        errors[method] = [layer.ffn.relative_error for layer in result.layers]
    # layer 0's FFN sees identical inputs under both methods (attention is pruned by SparseGPT in both)
    assert errors["sparsellm"][0] < 0.9 * errors["sparsegpt"][0]


def test_ffn_is_pruned_on_the_pruned_attention_outputs() -> None:
    """True sequence: the FFN's calibration inputs (and its dense target) come from the pruned attention."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    windows = calibration()
    result = prune_decoder(model, windows, PruneConfig("0.6", method="sparsegpt", layers=[0]), progress=False)
    captured = []
    layer = model.model.layers[0]
    handle = layer.mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(windows)
        handle.remove()
        x = torch.cat(captured)
        target = dense.model.layers[0].mlp(x)
        error = float(((layer.mlp(x) - target) ** 2).sum() / (target**2).sum())
    assert error == pytest.approx(result.layers[0].ffn.relative_error, rel=1e-4)


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_layer_mask_scope_counts_each_linear_and_lets_rows_differ(method: str) -> None:
    """``mask_scope="layer"``: every pruned linear has exactly ``round(s m n)`` zeros, spread unevenly
    over its rows (SparseGPT's per-block selection over all rows), for the attention and the FFN."""
    result = prune_decoder(tiny_model("llama", layers=2), calibration(), PruneConfig("0.6", method=method,
                                                                                   mask_scope="layer"), progress=False)
    row_counts = set()
    for mask in result.masks.values():
        assert int((~mask).sum()) == Unstructured(0.6, "layer").n_zeros(tuple(mask.shape))
        row_counts |= set((~mask).sum(dim=1).tolist())
    assert len(row_counts) > 1


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_without_true_sequence_every_linear_is_fitted_on_the_dense_layer(family: str) -> None:
    """``true_sequential=False``: the FFN (or the experts) and ``o`` are pruned on the dense layer's
    inputs, as the original SparseGPT code does; the recorded FFN error is the one on those inputs."""
    if family == "mixtral":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("mixtral")).eval()
        windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    else:
        model, windows = tiny_model(family), calibration()
    dense = copy.deepcopy(model)
    config = PruneConfig("0.6", method="sparsegpt", layers=[0], true_sequential=False)
    result = prune_decoder(model, windows, config, progress=False)
    sequential = prune_decoder(copy.deepcopy(dense), windows, replace(config, true_sequential=True), progress=False)
    # q, k, v see the same inputs either way; o does not
    attention = "model.layers.0.self_attn."
    assert torch.equal(result.masks[attention + "q_proj"], sequential.masks[attention + "q_proj"])
    assert not torch.equal(result.masks[attention + "o_proj"], sequential.masks[attention + "o_proj"])
    if family == "llama":
        captured = []
        mlp = dense.model.layers[0].mlp
        handle = mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            dense(windows)
            handle.remove()
            x = torch.cat(captured)
            target = mlp(x)
            error = float(((model.model.layers[0].mlp(x) - target) ** 2).sum() / (target**2).sum())
        assert error == pytest.approx(result.layers[0].ffn.relative_error, rel=1e-4)
    else:
        experts = [n for n in result.masks if ".experts" in n]
        assert experts and any(not torch.equal(result.masks[n], sequential.masks[n]) for n in experts)


def test_layer_offload_moves_one_decoder_layer_at_a_time_and_back() -> None:
    """``device=``: each decoder layer goes to the device for its turn (pruned or only run) and back
    home before the next one goes, in order; nothing else of the model is moved."""
    model = tiny_model("llama", layers=3)
    moves: list[tuple[str, str]] = []
    for i, layer in enumerate(model.model.layers):
        original = layer.to
        layer.to = lambda device, i=i, original=original: (moves.append((i, str(device))), original(device))[1]
    model.to = lambda *a, **k: pytest.fail("the whole model was moved")
    prune_decoder(model, calibration(), PruneConfig("0.5", method="sparsegpt", layers=[1], device="cpu"), progress=False)
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]      # layer 2 is past the last pruned one


def test_only_selected_layers_are_pruned() -> None:
    model = tiny_model("opt", layers=3)
    before = copy.deepcopy(model)
    result = prune_decoder(model, calibration(), PruneConfig("0.5", method="wanda", layers="1:2"), progress=False)
    assert [r.layer for r in result.layers] == [1]
    for i, (a, b) in enumerate(zip(before.model.decoder.layers, model.model.decoder.layers)):
        same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert same == (i != 1)


def test_select_layers() -> None:
    assert select_layers(None, 4) == [0, 1, 2, 3]
    assert select_layers("first-half", 30) == list(range(15))
    assert select_layers("2:", 4) == [2, 3]
    assert select_layers("3,1", 4) == [1, 3]
    for bad in ("7", "a:b", "3:3"):
        with pytest.raises(ValueError, match="layers"):
            select_layers(bad, 4)


def test_resume_from_checkpoints_gives_the_same_weights(tmp_path) -> None:
    windows = calibration()
    straight = tiny_model("llama", layers=3)
    prune_decoder(straight, windows, PruneConfig("0.6", method="sparsellm"), progress=False)
    first = tiny_model("llama", layers=3)
    prune_decoder(first, windows, PruneConfig("0.6", method="sparsellm"), checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "layer_0002.pt").unlink()            # as if killed during the last layer
    resumed = tiny_model("llama", layers=3)
    result = prune_decoder(resumed, windows, PruneConfig("0.6", method="sparsellm"), checkpoint_dir=tmp_path,
                           resume=True, progress=False)
    assert result.resumed_layers == [0, 1]
    assert len(result.layers) == 3
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="different settings"):
        prune_decoder(tiny_model("llama", layers=3), windows, PruneConfig("0.7", method="sparsellm"),
                      checkpoint_dir=tmp_path, resume=True, progress=False)
    manifest = tmp_path / "run.json"          # written before allocation_unit and allocation_ffn_scale existed
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k not in ("allocation_unit", "allocation_ffn_scale")}
    manifest.write_text(json.dumps(old))
    again = prune_decoder(tiny_model("llama", layers=3), windows, PruneConfig("0.6", method="sparsellm"),
                          checkpoint_dir=tmp_path, resume=True, progress=False)
    assert again.resumed_layers == [0, 1, 2]
    manifest.write_text(json.dumps({**old, "allocation_range": 0.2}))
    with pytest.raises(ValueError, match=r"different settings \(allocation_range\)"):
        prune_decoder(tiny_model("llama", layers=3), windows, PruneConfig("0.6", method="sparsellm"),
                      checkpoint_dir=tmp_path, resume=True, progress=False)


def test_checkpoints_resume_whether_the_preactivations_are_kept_or_recomputed(tmp_path) -> None:
    """``preactivations`` moves memory, not weights: a run that kept them resumes recomputing them, to the
    weights of a straight run."""
    windows = calibration()

    def config(preactivations: str) -> PruneConfig:
        return PruneConfig("0.6", method="sparsellm",
                           sparsellm=SparseLLMConfig.for_language_models(preactivations=preactivations))

    straight = tiny_model("llama", layers=2)
    prune_decoder(straight, windows, config("keep"), checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "layer_0001.pt").unlink()
    resumed = tiny_model("llama", layers=2)
    result = prune_decoder(resumed, windows, config("recompute"), checkpoint_dir=tmp_path, resume=True, progress=False)
    assert result.resumed_layers == [0]
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_a_setting_missing_from_an_old_manifest_counts_as_its_default(tmp_path) -> None:
    """A key absent from ``run.json`` stands for its default: resuming at the default goes on, resuming at
    another value (sparsellm under fisher now scales the FFN curves by 0.6, older runs by 1) is refused."""
    from sparsesolve.lm.checkpoint import LayerCheckpoints

    defaults = PruneConfig("0.6").to_dict()
    (tmp_path / "run.json").write_text(json.dumps({"method": "sparsellm", "allocation": "fisher"}))
    settings = {"method": "sparsellm", "allocation": "fisher", "allocation_ffn_scale": 1.0}
    assert LayerCheckpoints(tmp_path, settings, defaults).open(resume=True) == []
    with pytest.raises(ValueError, match=r"different settings \(allocation_ffn_scale\)"):
        LayerCheckpoints(tmp_path, {**settings, "allocation_ffn_scale": 0.6}, defaults).open(resume=True)
    with pytest.raises(ValueError, match=r"different settings \(allocation_ffn_scale\)"):
        LayerCheckpoints(tmp_path, settings).open(resume=True)          # without defaults: refused as before


def test_bad_models_and_inputs_raise_clear_errors() -> None:
    bert = AutoModelForCausalLM.from_config(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64, is_decoder=True))
    with pytest.raises(ValueError, match="model type 'bert' is not supported: FFN linears output.dense do not form"):
        ss.prune(bert, calibration(), method="sparsegpt", sparsity=0.5)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="multiple of 7"):
        ss.prune(model, calibration(), method="sparsegpt", pattern="3:7")
    with pytest.raises(ValueError, match="longer than the model's context"):
        ss.prune(model, calibration(1, 300), method="sparsegpt", sparsity=0.5)
    with pytest.raises(ValueError, match="token ids"):
        ss.prune(model, torch.randn(4, 16), method="sparsegpt", sparsity=0.5)
    with pytest.raises(ValueError, match="apply to method 'sparsellm' only"):
        ss.prune(model, calibration(), method="wanda", sparsity=0.5, iterations=3)


def test_sparsellm_warns_when_calibration_is_too_small_to_generalise() -> None:
    with pytest.warns(UserWarning, match="over-fit"):
        prune_decoder(tiny_model("llama"), calibration(2, 16), PruneConfig("0.5", method="sparsellm"), progress=False)


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_bfloat16_activation_storage_stays_close_to_float32(method: str) -> None:
    windows = calibration(16, 32)
    errors = {}
    for storage in (torch.float32, torch.bfloat16):
        model = tiny_model("llama")
        result = prune_decoder(model, windows, PruneConfig("0.5", method=method, storage_dtype=storage), progress=False)
        assert result.sparsity == 0.5 and model.dtype == torch.float32
        errors[storage] = result.layers[-1].ffn.relative_error
    assert errors[torch.bfloat16] == pytest.approx(errors[torch.float32], rel=0.2)
