"""fedcore.engine.cpu: denormals flushed in training, the collector paused, the stacked rows in huge pages."""

from __future__ import annotations

import gc
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from fedcore.engine.cpu import HUGE_PAGE, flush_denormals, gc_paused, huge_page_empty

TINY = torch.finfo(torch.float32).tiny


def _flushes() -> bool:
    return bool((torch.tensor([TINY]) * 0.5).item() == 0.0)


def test_denormals_are_flushed_inside_the_block_only() -> None:
    assert not _flushes()
    with flush_denormals():
        assert _flushes()
    assert not _flushes()
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("the setting is restored on the way out")
    assert not _flushes()


def test_the_collector_is_paused_inside_the_block_and_left_as_it_was() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("the collector is back on on the way out")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled(), "a collector that was off stays off"
    finally:
        gc.enable()


def test_adam_with_denormal_moments_moves_the_parameters_alike() -> None:
    """The claim behind flushing: a denormal first moment adds far less than a parameter's
    rounding step, so fused Adam gives bit-identical parameters either way."""
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(4, 5000, generator=gen) * 0.05
    grad = torch.randn(4, 5000, generator=gen) * 1e-3
    exp_avg = torch.randn(4, 5000, generator=gen) * 1e-4
    exp_avg_sq = torch.rand(4, 5000, generator=gen) * 1e-6
    zero = torch.rand(4, 5000, generator=gen) < 0.2
    grad[zero] = 0.0
    exp_avg[zero] = TINY / 7  # denormal, as after ~800 steps of zero gradient
    exp_avg_sq[zero] = 1e-30
    out = []
    for flush in (False, True):
        p, m, v = params.clone(), exp_avg.clone(), exp_avg_sq.clone()
        with flush_denormals() if flush else nullcontext():
            for _ in range(5):
                torch._fused_adam_(  # what torch.optim.Adam(fused=True) and the stacked trainer call
                    [p], [grad], [m], [v], [], [torch.tensor(100.0)], lr=1e-3, beta1=0.9, beta2=0.999,
                    weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                )  # fmt: skip
        out.append(p)
    assert torch.equal(out[0], out[1])


def test_a_large_tensor_is_huge_page_aligned_and_usable() -> None:
    t = huge_page_empty((3 * HUGE_PAGE // 4 + 17, 8), torch.float32)
    assert t.shape == (3 * HUGE_PAGE // 4 + 17, 8) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()


def test_small_tensors_are_plain_and_any_dtype_works() -> None:
    assert huge_page_empty((10, 3), torch.float32).shape == (10, 3)
    b = huge_page_empty((HUGE_PAGE, 4), torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.shape == (HUGE_PAGE, 4) and b.data_ptr() % HUGE_PAGE == 0


def _anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
    reason="no transparent huge pages on this kernel",
)
def test_the_kernel_backs_it_with_huge_pages() -> None:
    before = _anon_huge_kb()
    t = huge_page_empty((8 * HUGE_PAGE // 4,), torch.float32)
    t.fill_(1.0)  # the first touch maps the pages
    assert _anon_huge_kb() - before >= 4 * HUGE_PAGE // 1024
