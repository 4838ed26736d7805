"""AST building blocks: straight-through gradients, masked decay, mask refresh, distillation, SLoRB."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsesolve.core.patterns import NM
from sparsesolve.lm.slorb import SLoRB
from sparsesolve.retrain import (
    MaskedAdamW,
    SparseLinear,
    annealed_lambda,
    decay_terms,
    distillation_loss,
    masked_decay_gradient_,
    wrap_linears,
)


def _linear(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(8, 3) if kind == "linear" else Conv1D(3, 8)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_masked_and_gradient_is_straight_through(kind: str) -> None:
    """Forward equals the linear map with ``W * M``; the dense weight's gradient is the gradient with
    respect to the masked weight, unmasked (pruned entries get theirs too)."""
    module = _linear(kind)
    layer = SparseLinear(module)
    x = torch.randn(5, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    w = layer.weight_out_in().detach().clone()
    masked = (w * layer.mask).requires_grad_()
    expected = x @ masked.T + module.bias.detach()
    torch.testing.assert_close(layer(x), expected)
    (expected**2).sum().backward()
    (layer(x) ** 2).sum().backward()
    grad = module.weight.grad.T if kind == "conv1d" else module.weight.grad
    torch.testing.assert_close(grad, masked.grad)
    assert (grad[~layer.mask] != 0).any()


def test_mask_refresh_counts_flips_and_projection_is_exact_two_four() -> None:
    layer = SparseLinear(_linear("linear"))
    NM(2, 4).check_mask(layer.mask)
    assert layer.refresh_mask() == 0
    with torch.no_grad():  # swap the kept and pruned entries of row 0, first group
        row = layer.module.weight[0, :4]
        order = row.abs().argsort()
        row[order[0]], row[order[3]] = row[order[3]].item() * 10, row[order[0]].item() / 10
    before = layer.mask.clone()
    flips = layer.refresh_mask()
    assert flips == int((before != layer.mask).sum()) == 2
    layer.project_()
    NM(2, 4).check_mask(layer.module.weight != 0)


@pytest.mark.parametrize("form", ["gradient", "update"])
def test_masked_decay_touches_only_pruned_weights(form: str) -> None:
    """Regression for the int32 mask of the released code: kept weights get no decay at all."""
    layer = SparseLinear(_linear("conv1d"))
    w0 = layer.weight_out_in().detach().clone()
    if form == "gradient":
        layer.module.weight.grad = torch.zeros_like(layer.module.weight)
        masked_decay_gradient_([layer], 0.5)
        change = layer.module.weight.grad.T
    else:
        change = decay_terms([layer], 0.5)[layer.module.weight]().T
    torch.testing.assert_close(change, 0.5 * w0 * ~layer.mask)
    assert (change[layer.mask] == 0).all() and (change[~layer.mask] != 0).all()
    layer.mask = layer.mask.int()
    with pytest.raises(TypeError, match="boolean"):
        decay_terms([layer], 0.5)[layer.module.weight]()


def test_update_form_decay_follows_the_adam_recurrence_under_zero_loss_gradient() -> None:
    """The pruned weight's trajectory against a hand computation of the update form: the term enters the
    second moment and the normalised update, not the momentum (``optimizer.py``); a kept weight stays."""
    lr, lam, b1, b2, eps = 2e-4, 1e-4, 0.9, 0.95, 1e-8
    module = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[0.05, 0.8, -0.9, 0.01]]))
    layer = SparseLinear(module, mask=torch.tensor([[True, True, False, False]]))
    optimizer = MaskedAdamW([module.weight], lr=lr, betas=(b1, b2), eps=eps)
    w, m, v = [-0.9, 0.01], [0.0, 0.0], [0.0, 0.0]
    for t in range(1, 101):
        module.weight.grad = torch.zeros_like(module.weight)
        optimizer.step(decay=decay_terms([layer], lam))
        for i in range(2):
            d = lam * w[i]
            m[i] = b1 * m[i]
            v[i] = b2 * v[i] + (1 - b2) * d * d
            w[i] -= lr * (m[i] / (1 - b1**t) + d) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
    assert module.weight[0, 2].item() == pytest.approx(w[0], rel=1e-6)
    assert module.weight[0, 3].item() == pytest.approx(w[1], rel=1e-5)
    assert module.weight[0, 2].item() == pytest.approx(-0.9 + 100 * lr, rel=0.01)  # about lr per step, any scale
    assert 0 < w[1] < 1e-3  # 0.01 nearly gone in 100 steps (subtracting lr * lam * w per step would leave 0.01)
    assert torch.equal(module.weight[0, :2], torch.tensor([0.05, 0.8]))  # kept weights: no gradient, no decay


def test_masked_adamw_without_decay_is_torch_adamw() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = MaskedAdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    theirs = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(7, 5)
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_annealed_lambda_ramps_then_holds() -> None:
    assert [annealed_lambda(t, 1e-4, 4) for t in (0, 1, 4, 9)] == [0.0, 2.5e-5, 1e-4, 1e-4]
    assert annealed_lambda(0, 1e-4, 0) == 1e-4


def test_distillation_loss_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    labels = torch.tensor([[1, -100, 4]])
    t, a = 2.0, 0.67
    kl, ce = 0.0, 0.0
    for pos in (0, 2):
        p = [math.exp(v / t) for v in teacher[0, pos].tolist()]
        q = [math.exp(v / t) for v in student[0, pos].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
        s = student[0, pos].tolist()
        ce += (math.log(sum(math.exp(v) for v in s)) - s[labels[0, pos]]) / 2
    out = distillation_loss(student, teacher, labels, temperature=t, alpha_kd=a)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5) and out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(a * t * t * kl + (1 - a) * ce, rel=1e-5)
    assert distillation_loss(teacher, teacher, labels)["kl"].item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, alpha_kd=0.0)["loss"],
                               F.cross_entropy(student[0, [0, 2]], labels[0, [0, 2]]))


def test_distillation_is_finite_when_the_teacher_rules_tokens_out() -> None:
    """Teacher logits of -inf (a masked vocabulary entry): 0 * log 0 counts as 0, not NaN."""
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(1, 2, 6, generator=g), torch.randn(1, 2, 6, generator=g)
    teacher[..., 0] = float("-inf")
    labels = torch.tensor([[1, 2]])
    out = distillation_loss(student, teacher, labels)
    assert all(bool(torch.isfinite(v)) for v in out.values())
    finite = distillation_loss(student[..., 1:], teacher[..., 1:], labels - 1, alpha_kd=1.0)
    # the teacher's distribution lives on entries 1..5; the student's log-probabilities there differ by its mass on 0
    log_q = F.log_softmax(student / 2, dim=-1)[..., 1:]
    p = F.softmax(teacher[..., 1:] / 2, dim=-1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    assert out["kl"].item() == pytest.approx(expected.item(), rel=1e-6) and torch.isfinite(finite["kl"])


@pytest.mark.parametrize("trainable", [False, True])
def test_slorb_initialisation_and_exactness_on_blockwise_constant_inputs(trainable: bool) -> None:
    """``S_ij`` is the mean of row ``i``'s pruned weights in block ``j``; on inputs constant within
    each block the SLoRB-augmented pruned layer reproduces the dense layer exactly."""
    module = _linear("linear")
    layer = SparseLinear(module, slorb_k=4, slorb_trainable_projection=trainable)
    w, mask = module.weight.detach(), layer.mask
    for i in range(3):
        for j in range(2):
            block = slice(4 * j, 4 * j + 4)
            expected = float((w[i, block] * ~mask[i, block]).sum()) / 4
            assert layer.slorb.scale[i, j].item() == pytest.approx(expected, abs=1e-6)
    x = torch.randn(6, 2).repeat_interleave(4, dim=1)
    torch.testing.assert_close(layer(x), module(x))
    assert layer.slorb.parameter_count() == 3 * 2 + (8 * 2 if trainable else 0)
    with pytest.raises(ValueError, match="must divide"):
        SLoRB(w, mask, k=3)


def test_wrap_linears_replaces_named_modules_and_keeps_given_masks() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    mask = NM(2, 4).project(torch.rand(8, 8, generator=torch.Generator().manual_seed(0)))
    wrapped = wrap_linears(model, ["0", "2"], masks={"0": mask, "2": NM(2, 4).project(model[2].weight.abs())})
    assert isinstance(model[0], SparseLinear) and torch.equal(model[0].mask, mask) and set(wrapped) == {"0", "2"}
    with pytest.raises(ValueError, match="already"):
        wrap_linears(model, ["0"])
