"""Poisson subsampling for DP-SGD, drawn one way for every engine.

The sequential trainer (:func:`fedcore.plugins.privacy.dpsgd.poisson_batches`) and the
vectorized engine draw a round's batches with :func:`poisson_batches` from the same
generator (:meth:`fedcore.components.DPStep.sampling_generator`), one call per local
epoch, so both engines train on the same rows.
"""

from __future__ import annotations

import numpy as np
import torch


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of ``steps`` Poisson-subsampled batches of ``range(n)``, padded with -1.

    Each row is included in each batch independently with probability ``sample_rate``
    (as Opacus's ``UniformWithReplacementSampler``), at every site size: nothing is cut.
    Where a batch of about ``n q`` rows would often repeat an index (``(n q)^2 >= n``),
    each row's Bernoulli draw is made directly (O(n) a step; n is small there); otherwise
    the batch size is drawn ~ Binomial(n, q), then a uniform subset of that size by
    rejection (i.i.d. indices, redrawn while a batch repeats one) -- the same law.
    """
    if steps == 0:
        return torch.full((0, 0), -1, dtype=torch.long)
    if n * sample_rate * sample_rate >= 1:
        chosen = torch.rand(steps, n, generator=generator, dtype=torch.float64) < sample_rate
        counts = chosen.sum(dim=1)
        width = int(counts.max())
        order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices[:, :width]
        return torch.where(torch.arange(width).unsqueeze(0) < counts.unsqueeze(1), order, torch.full_like(order, -1))
    counts = torch.binomial(
        torch.full((steps,), float(n), dtype=torch.float64),
        torch.full((steps,), float(sample_rate), dtype=torch.float64),
        generator=generator,
    ).long()
    width = int(counts.max())
    if width == 0:
        return torch.full((steps, 0), -1, dtype=torch.long)
    columns = torch.arange(width).unsqueeze(0)
    keep = columns < counts.unsqueeze(1)
    draws = torch.randint(n, (steps, width), generator=generator)
    # Repeats are found by sorting each batch (numpy's sort of small rows is ~10x torch's on
    # a CPU); a batch without one is final, so only redrawn batches are checked again.
    padding = (-1 - columns).numpy()  # unique and negative: never equal to an index
    values, kept = draws.numpy(), keep.numpy()
    check = np.arange(steps)
    while True:
        ordered = np.sort(np.where(kept[check], values[check], padding), axis=1)
        repeated = check[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        if len(repeated) == 0:
            return torch.where(keep, draws, torch.full_like(draws, -1))
        draws[torch.from_numpy(repeated)] = torch.randint(n, (len(repeated), width), generator=generator)
        check = repeated
