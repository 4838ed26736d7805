"""Patterns: exact counts for every pattern and shape, parsing, and clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsesolve.core.patterns import NM, Unstructured, keep_largest, parse_pattern, round_half_up


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.99),
    scope=st.sampled_from(["row", "layer"]),
    seed=st.integers(0, 2**16),
)
def test_unstructured_exact_counts(rows: int, cols: int, sparsity: float, scope: str, seed: int) -> None:
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    pattern = Unstructured(sparsity, scope)
    mask = pattern.project(scores)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    if scope == "row":
        assert ((~mask).sum(dim=1) == round_half_up(sparsity * cols)).all()
    else:
        assert int((~mask).sum()) == round_half_up(sparsity * rows * cols)
    pattern.check_mask(mask)
    # every kept score is at least every pruned score in the same row (or layer)
    if scope == "row":
        for r in range(rows):
            kept, pruned = scores[r][mask[r]], scores[r][~mask[r]]
            if kept.numel() and pruned.numel():
                assert kept.min() >= pruned.max()


@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 8),
    nm=st.sampled_from([(2, 4), (4, 8), (3, 4), (1, 2), (0, 4), (5, 8)]),
    seed=st.integers(0, 2**16),
)
def test_nm_exact_counts(rows: int, groups: int, nm: tuple[int, int], seed: int) -> None:
    n, m = nm
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = NM(n, m).project(scores)
    zeros = (~mask).reshape(rows, groups, m).sum(dim=2)
    assert (zeros == n).all()
    NM(n, m).check_mask(mask)
    grouped = scores.reshape(rows, groups, m)
    kept = torch.where(mask.reshape(rows, groups, m), grouped, torch.inf).amin(dim=2)
    pruned = torch.where(~mask.reshape(rows, groups, m), grouped, -torch.inf).amax(dim=2)
    assert (kept >= pruned).all()


def test_keep_largest_per_slice_counts() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    mask = keep_largest(scores, torch.tensor([1, 2]), dim=1)
    assert mask.tolist() == [[True, False, True], [False, False, True]]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0.7", Unstructured(0.7)), ("70%", Unstructured(0.7)), (0.5, Unstructured(0.5)),
     ("2:4", NM(2, 4)), (" 3 : 4 ", NM(3, 4)), (NM(4, 8), NM(4, 8))],
)
def test_parse(spec: object, expected: object) -> None:
    assert parse_pattern(spec) == expected


@pytest.mark.parametrize("spec", ["1.0", "-0.1", "150%", "4:2", "2:2", "abc", "", True, 1.5])
def test_parse_rejects(spec: object) -> None:
    with pytest.raises(ValueError):
        parse_pattern(spec)


def test_nm_width_must_divide() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        NM(2, 4).project(torch.randn(3, 10))


def test_bad_scope_and_nan_scores() -> None:
    with pytest.raises(ValueError, match="scope"):
        Unstructured(0.5, "column")
    with pytest.raises(ValueError, match="NaN"):
        Unstructured(0.5).project(torch.tensor([[1.0, float("nan")]]))


def test_check_mask_detects_violation() -> None:
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    with pytest.raises(ValueError):
        NM(2, 4).check_mask(mask)
