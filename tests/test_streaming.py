"""Token-chunked sums: the same totals however the tokens are chunked."""

from __future__ import annotations

import pytest
import torch

from sparsesolve.core.streaming import accumulate_products


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("step", "chunk_size"), [(7, 20), (7, None), (50, 20), (None, None), (300, 64)])
def test_products_summed_in_any_chunks_are_the_products_over_all_tokens(step: int | None, chunk_size: int | None,
                                                                        dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(203, 9, generator=g, dtype=dtype), torch.randn(203, 5, generator=g, dtype=dtype)
    first, second = accumulate_products(203, step, chunk_size, lambda c: ([a[c], 2 * a[c, :4]], b[c]))
    assert first.dtype == dtype and first.shape == (9, 5) and second.shape == (4, 5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(first.double(), a.double().T @ b.double(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(second.double(), 2 * a[:, :4].double().T @ b.double(), rtol=tolerance, atol=tolerance)


def test_products_over_no_tokens_are_zeros_of_the_right_shape() -> None:
    (total,) = accumulate_products(0, 8, 8, lambda c: ([torch.empty(c.stop - c.start, 3)], torch.empty(c.stop - c.start, 4)))
    assert torch.equal(total, torch.zeros(3, 4))
