"""The AST loop on a tiny model: loss goes down, exact 2:4 output, SLoRB round trip, resume, warm start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import save_tiny, tiny_tokenizer

from sparsesolve.core.patterns import NM
from sparsesolve.lm.corpora import load_text
from sparsesolve.lm.models import load_model
from sparsesolve.retrain import RetrainConfig, loop, retrain, sparse_student

FAST = dict(seq_len=32, batch_size=4, lr=3e-3, eval_every=10, eval_windows=2, mask_interval=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("retrain")
    return save_tiny(folder / "tiny", "llama", tiny_tokenizer(load_text("wiki", "train")[:50_000]))


def _run(tiny: Path, out: Path, config: RetrainConfig, from_dir: Path | None = None, **kwargs) -> dict:
    teacher, tokenizer = load_model(str(tiny))
    student, _ = load_model(str(from_dir or tiny))
    layers = sparse_student(student, teacher, from_dir, slorb_k=kwargs.pop("slorb_k", None),
                            pruned=kwargs.pop("pruned", "zero"))
    return retrain(student, teacher, tokenizer, layers, config, out, progress=False, **kwargs)


def test_short_run_lowers_the_loss_and_saves_an_exact_two_four_model_with_slorb(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "ast"
    report = _run(tiny, out, RetrainConfig(tokens=40 * 4 * 32, **FAST), slorb_k=16)
    assert report["log"][0]["step"] == 0 and "wiki_validation_ppl" in report["log"][0]
    losses = [e["loss"] for e in report["log"][1:]]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(0 <= e["flip_rate"] <= 1 for e in report["log"] if "flip_rate" in e)
    assert sum("flip_rate" in e for e in report["log"]) == 8 and "wiki_validation_ppl" in report["log"][-1]
    masks = load_file(str(out / "masks.safetensors"))
    model, _ = load_model(str(out))  # attaches the SLoRB terms saved alongside
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].module.weight  # WithSLoRB(module, slorb)
        NM(2, 4).check_mask(mask)
        assert not ((weight != 0) & ~mask).any()
    assert report["slorb_parameters"] == sum(m.shape[0] * m.shape[1] // 16 for m in masks.values())
    saved = json.loads((out / "report.json").read_text())
    assert saved["steps"] == 40 and len(saved["log"]) == 41


def test_resume_continues_exactly(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = RetrainConfig(tokens=12 * 4 * 32, checkpoint_every=6, **FAST)
    straight = _run(tiny, tmp_path / "a", config)
    real_batch = loop.train_batch

    def interrupted(tokens, step, *args):
        if step == 8:
            raise KeyboardInterrupt
        return real_batch(tokens, step, *args)

    monkeypatch.setattr(loop, "train_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, tmp_path / "b", config)
    monkeypatch.setattr(loop, "train_batch", real_batch)
    with pytest.raises(ValueError, match="--resume"):
        _run(tiny, tmp_path / "b", config)
    resumed = _run(tiny, tmp_path / "b", config, resume=True)
    assert resumed["resumed_at"] == 6 and [e.get("loss") for e in resumed["log"]] == [e.get("loss") for e in straight["log"]]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_keeps_the_one_shot_weights_and_mask(tiny: Path, tmp_path: Path) -> None:
    """From a prune output folder: kept weights are the one-shot ones, the mask is held for the fixed phase,
    and ``pruned='dense'`` puts the teacher's values back at pruned positions."""
    from sparsesolve import prune
    from sparsesolve.lm.data import calibration_windows, corpus_tokens
    from sparsesolve.lm.output import OutputFolder

    model, tokenizer = load_model(str(tiny))
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), 4, 32)
    result = prune(model, windows, method="sparsegpt", pattern="2:4", progress=False)
    one_shot = tmp_path / "one-shot"
    folder = OutputFolder(one_shot)
    folder.begin()
    folder.commit(model, tokenizer, result.masks, {})
    teacher, _ = load_model(str(tiny))
    student, _ = load_model(str(one_shot))
    layers = sparse_student(student, teacher, one_shot, pruned="dense")
    name = next(iter(layers))
    dense, pruned = dict(teacher.named_modules())[name].weight, dict(model.named_modules())[name].weight
    w, keep = layers[name].weight_out_in().detach(), result.masks[name]
    assert torch.equal(layers[name].mask, keep)
    assert torch.equal(w[keep], pruned[keep]) and torch.equal(w[~keep], dense[~keep])
    report = _run(tiny, tmp_path / "warm", RetrainConfig(tokens=10 * 4 * 32, fixed_mask_steps=10, **FAST), from_dir=one_shot)
    assert not any("flip_rate" in e for e in report["log"])
    assert torch.equal(load_file(str(tmp_path / "warm" / "masks.safetensors"))[name], result.masks[name])
    with pytest.raises(ValueError, match="masks.safetensors"):
        sparse_student(load_model(str(tiny))[0], teacher, tiny)


def _one_shot_folder(tiny: Path, tmp_path: Path) -> tuple[Path, dict]:
    from sparsesolve import prune
    from sparsesolve.lm.data import calibration_windows, corpus_tokens
    from sparsesolve.lm.output import OutputFolder

    model, tokenizer = load_model(str(tiny))
    windows = calibration_windows(corpus_tokens(tokenizer, "wiki", "train"), 4, 32)
    result = prune(model, windows, method="sparsegpt", pattern="2:4", progress=False)
    folder = OutputFolder(tmp_path / "one-shot")
    folder.begin()
    folder.commit(model, tokenizer, result.masks, {})
    return tmp_path / "one-shot", result.masks


def test_slorb_of_a_warm_start_comes_from_the_teacher(tiny: Path, tmp_path: Path) -> None:
    """The one-shot weights are zero where pruned; S is the mean of the TEACHER's pruned weights per block."""
    one_shot, masks = _one_shot_folder(tiny, tmp_path)
    teacher, _ = load_model(str(tiny))
    student, _ = load_model(str(one_shot))
    layers = sparse_student(student, teacher, one_shot, slorb_k=16)
    dense = dict(teacher.named_modules())
    for name, layer in layers.items():
        w, keep = dense[name].weight.detach(), masks[name]
        expected = (w * ~keep).reshape(w.shape[0], -1, 16).mean(dim=2)
        torch.testing.assert_close(layer.slorb.scale.detach(), expected)
        assert float(layer.slorb.scale.detach().abs().max()) > 0


def test_the_retrained_student_is_the_saved_model(tiny: Path, tmp_path: Path) -> None:
    """After retrain() the student in memory (SLoRB included) gives the reloaded folder's logits."""
    teacher, tokenizer = load_model(str(tiny))
    student, _ = load_model(str(tiny))
    layers = sparse_student(student, teacher, None, slorb_k=16)
    retrain(student, teacher, tokenizer, layers, RetrainConfig(tokens=6 * 4 * 32, **FAST), tmp_path / "out", progress=False)
    reloaded, _ = load_model(str(tmp_path / "out"))
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reloaded(ids).logits, rtol=1e-5, atol=1e-5)


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_gradient_stops_the_run_or_skips_the_step(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      policy: str) -> None:
    real_loss, calls = loop._loss, []

    def planted(student, teacher, window, config):
        parts = real_loss(student, teacher, window, config)
        calls.append(1)
        if len(calls) == 8:  # step 8, after the checkpoint of step 6
            parts["loss"] = _NaNGradient.apply(parts["loss"])
        return parts

    monkeypatch.setattr(loop, "_loss", planted)
    config = RetrainConfig(tokens=10 * 4 * 32, checkpoint_every=6, on_nonfinite=policy, **FAST)
    out = tmp_path / policy
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="non-finite gradient norm at step 8"):
            _run(tiny, out, config)
        state = torch.load(tmp_path / f"{policy}.partial" / "checkpoints" / "retrain.pt", weights_only=False)
        assert state["step"] == 6 and all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    else:
        report = _run(tiny, out, config)
        skipped = [e for e in report["log"] if e.get("skipped")]
        assert [e["step"] for e in skipped] == [8]
        weights = load_file(str(out / "model.safetensors"))
        assert all(bool(torch.isfinite(v).all()) for v in weights.values())
