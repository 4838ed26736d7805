"""2:4 layout validation for the semi-structured kernels (the conversion itself needs CUDA)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsesolve.core.patterns import NM
from sparsesolve.deploy.semistructured import is_two_four, layout_report, to_semi_structured
from sparsesolve.deploy.torchao_sparse import SCHEMES, TORCHAO_RANGE, check_torchao_version, to_torchao


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


def test_to_torchao_refuses_where_no_path_runs_before_changing_anything() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 64))
    model[0].weight.data *= NM(2, 4).project(model[0].weight.abs())
    model = model.half()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="unknown scheme 'int2-2:4'"):
        to_torchao(model, "int2-2:4")
    if not torch.cuda.is_available():
        for scheme in SCHEMES:
            with pytest.raises(ValueError, match="run on CUDA GPUs of compute capability 8.0 or newer; the model is on cpu"):
                to_torchao(model, scheme)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(("version", "scheme", "ok"), [
    ("0.15.0", "int4-2:4", True), ("0.16.0", "int4-2:4", False), ("0.16.1", "int8-2:4", True),
    ("0.17.0", "int8-2:4", False), ("0.18.0+cu130", "semi-sparse", True), ("0.14.1", "semi-sparse", False),
    ("0.19.0.dev20261101", "semi-sparse", False)])
def test_torchao_versions_are_gated_per_scheme(version: str, scheme: str, ok: bool) -> None:
    if ok:
        check_torchao_version(version, scheme)
    else:
        with pytest.raises(ValueError, match=f"needs torchao >= 0.15 and < .*; torchao {version} is installed"):
            check_torchao_version(version, scheme)


def test_the_torchao_extra_is_the_range_the_schemes_cover() -> None:
    extras = configparser.ConfigParser()
    extras.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    requirement = extras["options.extras_require"]["torchao"].strip()
    low, high = (".".join(map(str, v)) for v in TORCHAO_RANGE)
    assert requirement == f"torchao>={low},<{high}"
    assert min(s.first for s in SCHEMES.values()) == TORCHAO_RANGE[0] and max(s.last for s in SCHEMES.values()) == TORCHAO_RANGE[1]
