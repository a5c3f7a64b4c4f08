"""The ring's tile arithmetic: column log-sum-exps from the row pass, and the softplus sum.

Shapes: t1 × t2 tiles of logits.
"""

from __future__ import annotations

import pytest
import torch

from vlp.distributed import LocalBackend, RingBackend
from vlp.distributed.ring_contrastive import (
    COLUMNS_FROM_ROWS_RANGE,
    _column_lse,
    _lse,
    _softplus_sum,
)


def tile(spread: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(37, 29, generator=g, dtype=torch.float64) * spread).to(dtype)


@pytest.mark.parametrize("spread", [0.5, 5.0, 60.0], ids=["narrow", "wide", "beyond-range"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_column_lse_from_row_exponentials_matches_logsumexp(spread: float, dtype):
    logits = tile(spread, dtype)
    column_maxima = logits.amax(0)
    narrow = (column_maxima.max() - column_maxima.min()).item() < COLUMNS_FROM_ROWS_RANGE
    assert narrow == (spread < 60)  # both branches of _column_lse are taken
    scratch = torch.empty_like(logits)
    _, row_peak = _lse(logits, 1, scratch)
    actual = _column_lse(logits, scratch, row_peak)
    expected = torch.logsumexp(logits.double(), 0)
    tol = 1e-12 if dtype == torch.float64 else 2e-6 * max(1.0, spread)
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_column_lse_of_left_out_columns_is_minus_inf_and_the_others_reuse_the_rows(dtype):
    """Columns of only −inf (multipos padding) neither break the row reuse nor get a finite LSE."""
    logits = tile(5.0, dtype)
    logits[:, ::3] = float("-inf")
    scratch = torch.empty_like(logits)
    _, row_peak = _lse(logits, 1, scratch)
    exps = scratch.clone()
    direct = _lse(logits, 0, torch.empty_like(logits))[0]
    reused = _column_lse(logits, scratch, row_peak)
    assert torch.equal(scratch, exps)  # the direct path would have overwritten the scratch
    assert reused[::3].isneginf().all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(reused, direct, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_softplus_sum_matches_logaddexp_with_zero_over_the_whole_range(dtype):
    logits = torch.linspace(-120, 120, 4001, dtype=torch.float64).reshape(-1, 1)
    scratch, scratch2 = torch.empty_like(logits, dtype=dtype), torch.empty_like(logits, dtype=dtype)
    actual = _softplus_sum(logits.to(dtype), scratch, scratch2)
    expected = torch.logaddexp(logits, torch.zeros(())).sum()  # F.softplus returns x above 20
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=0)


def test_ring_matches_local_when_logits_spread_beyond_the_row_reuse_range():
    g = torch.Generator().manual_seed(5)
    image = (torch.randn(20, 8, generator=g, dtype=torch.float64) * 6).requires_grad_()
    text = (torch.randn(20, 8, generator=g, dtype=torch.float64) * 6).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in (LocalBackend(), RingBackend(tile_size=7)):
        loss = backend.softmax(image, text, scale)
        grads = torch.autograd.grad(loss, (image, text, scale))
        results.append((loss, *grads))
    for actual, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
