"""fedcore.noise: the Gaussian streams every DP-SGD step draws its noise from."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

import fedcore.engine.native as native
import fedcore.noise as noise_module
from fedcore.noise import AHEAD_MIN_BYTES, DeviceGaussianNoise, GaussianNoise, allow_helper

KEYS = [bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))]


def _reference(key: bytes, width: int, draws: int, std: float) -> np.ndarray:
    """The documented construction written independently: AES-128-CTR keystream over a zero
    counter, 2*ceil(P/2) little-endian 32-bit words per draw, Box-Muller in float64."""
    half = -(-width // 2)
    words = np.frombuffer(
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * half * draws)), dtype="<u4"
    ).reshape(draws, 2 * half)
    k1, k2 = words[:, :half].astype(np.float64), words[:, half:].astype(np.float64)
    radius = std * np.sqrt(-2.0 * np.log((k1 + 1.0) / 2.0**32))
    angle = 2.0 * math.pi * k2 / 2.0**32
    return np.concatenate([radius * np.cos(angle), (radius * np.sin(angle))[:, : width - half]], axis=1)


@pytest.fixture(params=["native", "numpy"])
def transform(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both transforms: the native one (where the native code builds, as in CI) and numpy's."""
    if request.param == "numpy":
        monkeypatch.setattr(noise_module, "gaussian_from_bits", lambda: None)
    elif noise_module.gaussian_from_bits() is None:
        pytest.skip(f"native code unavailable: {native.unavailable_reason()}")
    return str(request.param)


@pytest.mark.parametrize("width", [7, 10, 15427])
def test_values_are_the_documented_box_muller_over_aes_ctr(width: int, transform: str) -> None:
    noise = GaussianNoise([KEYS[0]], width, torch.float64)
    assert (noise._native is not None) == (transform == "native")
    got = np.stack([noise.sample(0.5).numpy() for _ in range(3)])
    np.testing.assert_allclose(got, _reference(KEYS[0], width, 3, 0.5), rtol=1e-12, atol=1e-15)


def test_float32_values_are_the_reference_to_a_few_ulp(transform: str) -> None:
    """In float32 the transform runs in float32 (as documented): the reference to its rounding."""
    noise = GaussianNoise([KEYS[1]], 1001, torch.float32)
    got = noise.sample(2.0).numpy()
    np.testing.assert_allclose(got, _reference(KEYS[1], 1001, 1, 2.0)[0], rtol=5e-6, atol=5e-6)


def test_both_transforms_draw_the_same_rows_and_skip_the_same_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    if noise_module.gaussian_from_bits() is None:
        pytest.skip(f"native code unavailable: {native.unavailable_reason()}")
    native_noise = GaussianNoise(KEYS, 333, torch.float32)
    monkeypatch.setattr(noise_module, "gaussian_from_bits", lambda: None)
    numpy_noise = GaussianNoise(KEYS, 333, torch.float32)
    for rows in (None, [True, False, True], [False, False, False]):
        a = native_noise.draw(torch.full((3, 333), 7.0), [1.0, 0.5, 3.0], rows)
        b = numpy_noise.draw(torch.full((3, 333), 7.0), [1.0, 0.5, 3.0], rows)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        if rows is not None:
            assert not a[[not r for r in rows]].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_are_normal_with_their_own_standard_deviation(dtype: torch.dtype) -> None:
    std = [0.5, 2.0, 1.0]
    noise = GaussianNoise(KEYS, 20_001, dtype)
    out = torch.empty(3, 20_001, dtype=dtype)
    draws = np.concatenate([noise.draw(out, std).numpy().astype(np.float64) for _ in range(5)], axis=1)
    for row, s in zip(draws, std, strict=True):
        assert stats.kstest(row / s, "norm").pvalue > 1e-3
        n = len(row)
        assert abs(row.mean()) < 4 * s / math.sqrt(n)
        assert abs(row.std() - s) < 4 * s / math.sqrt(2 * n)
    assert abs(np.corrcoef(draws[0], draws[2])[0, 1]) < 4 / math.sqrt(draws.shape[1])


def test_tails_have_the_normal_mass_up_to_the_documented_bound() -> None:
    """32-bit uniforms: radii up to sqrt(2 ln 2^32) = 6.66 sd (torch's 24-bit ones stop at 5.77)."""
    values = np.concatenate([GaussianNoise([KEYS[1]], 1_000_000).sample(1.0).numpy() for _ in range(4)])
    assert np.isfinite(values).all()
    assert 4.5 < np.abs(values).max() <= math.sqrt(2 * 32 * math.log(2)) + 1e-5
    # Two-sided tail mass beyond 4 sd: 6.3e-5 of 4 million values, about 253.
    assert 180 < (np.abs(values) > 4).sum() < 330


def test_same_key_same_values_and_rows_that_skip_a_draw_do_not_advance() -> None:
    a, b = GaussianNoise(KEYS, 64), GaussianNoise(KEYS, 64)
    out_a, out_b = torch.empty(3, 64), torch.empty(3, 64)
    first = a.draw(out_a, [1.0] * 3).clone()
    torch.testing.assert_close(first, b.draw(out_b, [1.0] * 3), rtol=0, atol=0)
    assert not torch.equal(first[0], first[1]), "each row has its own stream"
    skipped = a.draw(out_a, [1.0] * 3, rows=[True, False, True]).clone()
    assert not skipped[1].any()
    again = a.draw(out_a, [1.0] * 3).clone()
    expected = GaussianNoise([KEYS[1]], 64)
    expected.sample(1.0)
    torch.testing.assert_close(again[1], expected.sample(1.0), rtol=0, atol=0)
    torch.testing.assert_close(skipped[0], b.draw(out_b, [1.0] * 3)[0], rtol=0, atol=0)


@pytest.mark.parametrize("width", [5, 8])
def test_streams_go_on_from_their_positions_after_the_native_step_drew(width: int, transform: str) -> None:
    """``position`` counts each stream's keystream bytes (8 ceil(P/2) a draw; width 5 ends a
    draw mid-block); after :meth:`native_streams` handed the streams out -- the native step
    advances the positions in place -- drawing goes on from wherever they stand."""
    a, b = GaussianNoise(KEYS, width), GaussianNoise(KEYS, width)
    draws = [a.draw(torch.empty(3, width), [1.0] * 3, rows).clone() for rows in (None, [True, False, True], None, None)]
    assert a.position.tolist() == [32 * -(-width // 2), 24 * -(-width // 2), 32 * -(-width // 2)]
    assert torch.equal(b.draw(torch.empty(3, width), [1.0] * 3), draws[0])
    streams = b.native_streams([1.0] * 3)
    assert streams.keys.tolist() == [list(key) for key in KEYS] and streams.at.tolist() == [8 * -(-width // 2)] * 3
    streams.at.add_(torch.tensor([8, 0, 8]) * -(-width // 2))  # as the native step would after drawing rows 0 and 2
    assert b.position.tolist() == [16 * -(-width // 2), 8 * -(-width // 2), 16 * -(-width // 2)]
    for expected in draws[2:]:
        assert torch.equal(b.draw(torch.empty(3, width), [1.0] * 3), expected)


def test_wrong_buffers_and_keys_are_refused() -> None:
    noise = GaussianNoise(KEYS, 8)
    with pytest.raises(ValueError, match="contiguous CPU"):
        noise.draw(torch.empty(3, 8, dtype=torch.float64), [1.0] * 3)
    with pytest.raises(ValueError, match="contiguous CPU"):
        noise.draw(torch.empty(8, 3).t(), [1.0] * 3)
    with pytest.raises(ValueError, match="16 bytes"):
        GaussianNoise([b"short"], 8)
    with pytest.raises(ValueError, match="float32 or float64"):
        GaussianNoise(KEYS, 8, torch.float16)


def test_the_device_sampler_draws_each_row_at_its_scale_and_skips_rows_that_do_not_step() -> None:
    """DeviceGaussianNoise is what the vectorized engine uses on CUDA; its contract is
    checked here on the CPU (CI has no GPU)."""
    noise = DeviceGaussianNoise(KEYS[:2], 20_000, torch.float32, "cpu")
    out = torch.empty(2, 20_000)
    draws = noise.draw(out, [0.5, 3.0]).double()
    for row, s in zip(draws, (0.5, 3.0), strict=True):
        assert abs(float(row.std()) - s) < 4 * s / math.sqrt(2 * len(row))
    again = DeviceGaussianNoise(KEYS[:2], 20_000, torch.float32, "cpu")
    skipped = again.draw(torch.empty(2, 20_000), [0.5, 3.0], rows=[False, True])
    assert not skipped[0].any()
    fresh = DeviceGaussianNoise(KEYS[:1], 20_000, torch.float32, "cpu").draw(torch.empty(1, 20_000), [0.5])
    torch.testing.assert_close(fresh[0], draws[0].float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        noise.draw(torch.empty(3, 20_000), [1.0] * 3)


@pytest.mark.parametrize("ahead", [False, True])
def test_per_step_draws_what_draw_after_draw_gives(ahead: bool) -> None:
    """Drawing one step ahead in a helper thread changes nothing but when the values are made."""
    rows = np.random.default_rng(0).random((3, 9)) < 0.8
    std = [0.5, 2.0, 1.0]
    width = AHEAD_MIN_BYTES // 4 // 3 + 1  # big enough to be drawn ahead
    inline = GaussianNoise(KEYS, width, torch.float32)
    expected = [inline.draw(torch.empty(3, width), std, rows[:, t]).clone() for t in range(9)]
    got = []
    for t, out in enumerate(GaussianNoise(KEYS, width, torch.float32).per_step(std, rows, ahead=ahead)):
        got.append(out.clone())
        out.add_(float(t))  # the caller writes into the step's buffer, as the DP step does
    assert len(got) == 9
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("ahead", [False, True])
def test_per_block_draws_what_per_step_gives(ahead: bool) -> None:
    """Blocks of steps (the native step's calls) hold step after step the draws of
    :meth:`per_step`, whatever the caller writes into a block it was given."""
    rows = np.random.default_rng(1).random((3, 9)) < 0.8
    std = [0.5, 2.0, 1.0]
    width = AHEAD_MIN_BYTES // 4 // 3 + 1
    expected = [out.clone() for out in GaussianNoise(KEYS, width, torch.float32).per_step(std, rows, ahead=False)]
    got = []
    for block in GaussianNoise(KEYS, width, torch.float32).per_block(std, rows, [4, 1, 4], ahead=ahead):
        assert block.shape[1:] == (3, width)
        got += [step.clone() for step in block]
        block.add_(1.0)
    assert len(got) == 9
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    with pytest.raises(ValueError, match="do not split"):
        next(GaussianNoise(KEYS, 8).per_block(std, rows, [4, 4]))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the helper thread needs a second CPU")
def test_only_a_large_buffer_is_drawn_ahead() -> None:
    rows = np.ones((3, 4), dtype=bool)

    def helper_running(width: int) -> bool:
        seen = False
        for _ in GaussianNoise(KEYS, width, torch.float32).per_step([1.0] * 3, rows):
            seen |= any(t.name.startswith("fedcore-noise") for t in threading.enumerate())
        return seen

    assert helper_running(AHEAD_MIN_BYTES // 4 // 3 + 1)
    assert not helper_running(1000)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the helper thread needs a second CPU")
def test_no_helper_where_the_process_is_told_the_cores_are_busy() -> None:
    """Workers that keep every core busy draw inline (fedcore.engine.runner turns the helper off)."""
    rows = np.ones((3, 4), dtype=bool)
    width = AHEAD_MIN_BYTES // 4 // 3 + 1
    allow_helper(False)
    try:
        for _ in GaussianNoise(KEYS, width, torch.float32).per_block([1.0] * 3, rows, [2, 2]):
            assert not any(t.name.startswith("fedcore-noise") for t in threading.enumerate())
    finally:
        allow_helper(True)


def test_per_step_refuses_rows_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"rows must be \(3, steps\)"):
        next(GaussianNoise(KEYS, 8).per_step([1.0] * 3, np.ones((2, 4), dtype=bool)))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-7), (torch.float64, 1e-15)])
def test_the_native_sine_and_cosine_hold_at_every_quarter_turn(dtype: torch.dtype, tol: float) -> None:
    """The native transform splits the nearest quarter turn off the angle 2 pi k / 2^32 in
    integers: angles at and beside each boundary, and just short of a full turn, are the
    reference's to rounding."""
    transform = noise_module.gaussian_from_bits()
    if transform is None:
        pytest.skip(f"native code unavailable: {native.unavailable_reason()}")
    boundaries = [q * 2**29 + d for q in range(8) for d in (-1, 0, 1)] + [2**32 - 1, 1]
    k2 = np.array([k % 2**32 for k in boundaries] + list(np.random.default_rng(1).integers(0, 2**32, 500)), dtype=np.uint64)
    k1 = np.full(len(k2), 2**31, dtype=np.uint64)  # radius sqrt(2 ln 2)
    bits = np.concatenate([k1, k2]).astype(np.uint32)[None, :]
    out = torch.empty(1, 2 * len(k2), dtype=dtype)
    transform(torch.from_numpy(bits.view(np.int32)), out, [1.0], [0])
    radius = math.sqrt(-2.0 * math.log((2**31 + 1) / 2**32))
    angle = 2.0 * math.pi * k2.astype(np.float64) / 2**32
    got = out.numpy()[0].astype(np.float64)
    np.testing.assert_allclose(got[: len(k2)], radius * np.cos(angle), rtol=0, atol=8 * tol * radius)
    np.testing.assert_allclose(got[len(k2) :], radius * np.sin(angle), rtol=0, atol=8 * tol * radius)
