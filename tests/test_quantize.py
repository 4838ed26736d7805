"""Joint sparsification and quantisation: the quantiser's error bound, grid membership, compensation."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs, random_weight
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsesolve.core.patterns import NM, Unstructured
from sparsesolve.core.quantize import GroupQuantizer
from sparsesolve.core.solvers import reconstruction_error, sparsegpt


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 6), cols=st.integers(1, 40), seed=st.integers(0, 999))
def test_quantiser_error_is_at_most_half_a_step_and_zero_is_exact(bits: int, rows: int, cols: int, seed: int) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w[:, ::3] = 0.0
    quantizer = GroupQuantizer(bits, groupsize=cols)
    scale, zero = quantizer.params(w)
    q = quantizer.quantize(w, scale, zero)
    assert ((w - q).abs() <= scale / 2 * (1 + 1e-9)).all()
    assert (q[:, ::3] == 0).all()
    codes = quantizer.codes(w, scale, zero)
    assert ((codes >= 0) & (codes <= 2**bits - 1) & (codes == codes.round())).all()


@pytest.mark.parametrize("pattern", [NM(2, 4), Unstructured(0.5)], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_joint_sparsegpt_is_on_the_grid_respects_the_mask_and_compensates(pattern, bits: int) -> None:
    """At most 2^bits distinct values per row and group (0 among them), exact sparsity, and a lower
    reconstruction error than quantising SparseGPT's result afterwards without compensation; at 8 bits
    about the unquantised error."""
    x = correlated_inputs(512, 64, seed=3).double()
    h, w = x.T @ x, random_weight(16, 64, seed=4).double()
    quantizer = GroupQuantizer(bits, groupsize=32)
    joint = sparsegpt(w, h, pattern, quantizer=quantizer)
    pattern.check_mask(joint.mask)
    assert (joint.weight[~joint.mask] == 0).all()
    for row in joint.weight:
        for first in (0, 32):
            assert len(torch.unique(row[first : first + 32])) <= 2**bits
    plain = sparsegpt(w, h, pattern)
    afterwards = quantizer.round_trip(plain.weight)
    assert joint.error < reconstruction_error(afterwards, w, h)
    assert torch.equal(joint.mask, plain.mask)  # the quantised pass keeps the sparse pass's mask
    if bits == 8:
        assert joint.error == pytest.approx(plain.error, rel=1e-3)


def test_quantiser_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="between 2 and 8"):
        GroupQuantizer(1)
