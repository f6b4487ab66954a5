"""Poisson sampling in the vectorized engine: every row, in every batch, with probability q.

What the accountant assumes (each training row independently in each step's batch
with probability ``sample_rate``), checked by inclusion frequencies per row (a small
site: every row; a large one: rows in ten index blocks) and by the batch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcore.sampling import poisson_batches


def _inclusions(n: int, q: float, steps: int, seed: int, per_call: int) -> tuple[np.ndarray, np.ndarray]:
    """Inclusion counts per row and batch sizes over ``steps`` batches, drawn ``per_call`` at a
    time as the engine draws them (one call per local epoch)."""
    generator = torch.Generator().manual_seed(seed)
    counts = np.zeros(n, dtype=np.int64)
    sizes = []
    for _ in range(steps // per_call):
        batches = poisson_batches(n, q, per_call, generator)
        real = batches >= 0
        assert all(len(torch.unique(b[b >= 0])) == int((b >= 0).sum()) for b in batches), "a batch repeats a row"
        counts += np.bincount(batches[real].numpy(), minlength=n)
        sizes += real.sum(dim=1).tolist()
    return counts, np.asarray(sizes)


@pytest.mark.parametrize("q", [32 / 50, 0.3, 0.05])
def test_every_row_of_a_50_row_site_is_drawn_with_probability_q(q: float) -> None:
    steps = 20_000
    # a site of 50 rows at the paper's batch of 32 takes 2 steps an epoch
    counts, sizes = _inclusions(50, q, steps, seed=1, per_call=2)
    sd = np.sqrt(q * (1 - q) / steps)
    frequency = counts / steps
    assert np.all(np.abs(frequency - q) < 5 * sd), (frequency.min(), frequency.max(), q)
    # no position bias: the last rows are drawn as often as the first
    assert abs(frequency[-10:].mean() - frequency[:10].mean()) < 5 * sd * np.sqrt(2 / 10)
    assert abs(sizes.mean() - 50 * q) < 5 * np.sqrt(50 * q * (1 - q) / steps)


def test_rows_of_a_50000_row_site_are_drawn_with_probability_q() -> None:
    n, q, steps = 50_000, 32 / 50_000, 4_000
    counts, sizes = _inclusions(n, q, steps, seed=2, per_call=1_000)
    blocks = counts.reshape(10, -1).sum(axis=1)  # ten blocks of 5,000 consecutive rows
    expected = n / 10 * steps * q
    assert np.all(np.abs(blocks - expected) < 5 * np.sqrt(expected * (1 - q))), (blocks, expected)
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.var() - n * q * (1 - q)) < 0.15 * n * q  # Binomial(n, q) spread
