"""Distillation from a frozen dense teacher (AST): forward KL at temperature ``T`` mixed with the LM loss.

    L = alpha_kd * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha_kd) * CE(student, labels)

with ``p^T = softmax(logits / T)``, the KL summed over the vocabulary and averaged over the tokens that
have a label (``labels != -100``), the ``T^2`` factor keeping gradient scales comparable across ``T``.
Defaults ``T = 2``, ``alpha_kd = 0.67`` (the paper's choice for 125M models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha_kd: float = 0.67) -> dict[str, torch.Tensor]:
    """``{"loss", "kl", "ce"}`` for logits ``(batch, seq, vocab)`` predicting ``labels`` ``(batch, seq)``
    (already shifted: position ``t`` predicts ``labels[:, t]``; ``-100`` is ignored)."""
    if not 0.0 <= alpha_kd <= 1.0 or temperature <= 0:
        raise ValueError(f"distillation needs 0 <= alpha_kd <= 1 and temperature > 0, got {alpha_kd}, {temperature}")
    vocab = student_logits.shape[-1]
    keep = labels.reshape(-1) != -100
    student = student_logits.reshape(-1, vocab)[keep].float()
    teacher = teacher_logits.reshape(-1, vocab)[keep].float().detach()
    ce = F.cross_entropy(student, labels.reshape(-1)[keep])
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    # 0 * log 0 = 0: entries the teacher rules out (logit -inf) contribute nothing, not NaN
    terms = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), torch.zeros_like(p_teacher))
    kl = terms.sum(dim=-1).mean()
    return {"loss": alpha_kd * temperature**2 * kl + (1 - alpha_kd) * ce, "kl": kl, "ce": ce}
