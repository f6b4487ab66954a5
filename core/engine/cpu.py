"""Settings a training loop runs faster under on the CPU, the numbers unchanged.

- **Denormals flushed to zero** (:func:`flush_denormals`). Adam's first moment of a
  parameter whose gradient is exactly zero for a while (a one-hot feature absent from a
  batch, a ReLU unit that does not fire) decays by 0.9 a step and after ~800 steps is a
  denormal float32 (below 1.2e-38); in the paper's centralized training ~12 % of the
  moments are. Every vector instruction that reads or makes one then takes a microcode
  assist: a fused Adam over ``(10, 15427)`` with 12 % denormal moments took 4.4x its
  time without them. With flush-to-zero and denormals-are-zero the moment is zero
  instead; what it would have added to a parameter (at most ``lr x 1.2e-38 / eps``,
  ~1e-33) is far below a float32 parameter's rounding step, so the parameters come out
  the same. DP-SGD's noise keeps every moment normal; this is for the non-private steps.
- **Transparent huge pages** (:func:`huge_page_empty`) for the stacked training rows: a
  step gathers a few hundred random rows out of ~180 MB, and with 4 KB pages nearly every
  row is a TLB miss (an epoch's gathers of 10 copies: 0.6 CPU s with 4 KB pages, 0.16
  with 2 MB ones).
- **Python's cyclic garbage collector paused** (:func:`gc_paused`) over the epochs: a step
  makes a few short-lived objects (tensor handles, Adam's settings), which reference counting
  frees, yet every few hundred of them set off a collection that walks the young objects
  and now and then every object of the process (torch's modules, the spec's models): 1-2 %
  of the paper run's CPU samples were the collector's.
"""

from __future__ import annotations

import gc
import math
import mmap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

#: the x86-64 huge page; an allocation smaller than a few of them gains nothing
HUGE_PAGE = 2 << 20


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero in this thread while the block runs (where the CPU
    can: x86 with SSE3, Arm), then back to IEEE behaviour."""
    on = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while the block runs (back on after, if it was on;
    reference counting still frees everything not in a cycle, and a collection after the
    block frees cycles made within it)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def huge_page_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor whose memory the kernel is asked to back with
    transparent huge pages (``madvise(MADV_HUGEPAGE)``; a plain ``torch.empty`` where the
    tensor is small or the platform has no such advice).

    :param shape: the tensor's shape.
    :param dtype: its dtype.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    nbytes = math.prod(shape) * dtype.itemsize
    if advice is None or nbytes < 4 * HUGE_PAGE:
        return torch.empty(tuple(shape), dtype=dtype)
    # Private: a shared anonymous mapping is shmem, which gets no anonymous huge pages.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(advice)  # before the first touch: the page faults then map huge pages
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping for the tensor's life
    start = -raw.data_ptr() % HUGE_PAGE  # the first 2 MB boundary inside the mapping
    return raw[start : start + nbytes].view(dtype).view(tuple(shape))
