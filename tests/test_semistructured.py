"""2:4 layout validation for the semi-structured kernels (the conversion itself needs CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsesolve.core.patterns import NM
from sparsesolve.deploy.semistructured import is_two_four, layout_report, to_semi_structured


def test_is_two_four_counts_nonzeros_per_group_of_four() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_two_four(w)
    w[0, 1] = 5.0
    assert not is_two_four(w)
    assert not is_two_four(torch.zeros(2, 6))  # inputs not a multiple of 4


def test_layout_report_and_the_cpu_refusal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 64), nn.Linear(64, 48), Conv1D(64, 64), nn.Embedding(10, 64))
    for module in (model[0], model[2]):
        module.weight.data *= NM(2, 4).project(module.weight.abs())
    with torch.no_grad():
        model[3].weight.zero_()
    report = layout_report(model)
    assert report["eligible"] == ["0"]
    assert report["ineligible"] == {"1": "weight is not 2:4",
                                    "2": "shape (48, 64) is not a multiple of (32, 64) for cutlass torch.float16",
                                    "3": "Conv1D is not nn.Linear"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="need a CUDA GPU"):
            to_semi_structured(model)
    with pytest.raises(ValueError, match="do not support"):
        layout_report(model, dtype=torch.float64)
