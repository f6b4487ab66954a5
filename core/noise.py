"""Gaussian noise for DP-SGD: keyed AES-128-CTR streams, Box-Muller in numpy's SIMD kernels.

Drawing ``P`` Gaussian values per site and step is, after the matmuls, the largest cost
of a DP-SGD step for a small model (the paper's MLP has 15,427 parameters). torch's CPU
sampler (``Tensor.normal_``) draws every uniform from one mt19937 call, about 2.4 ns a
value on the reference machine; here the uniform bits come from AES-128 in counter mode
(``cryptography``/OpenSSL with AES-NI, about 0.3 ns per 32 bits) and the Box-Muller
transform runs in one native pass per row (``core/engine/gaussian.cpp``, the log from glibc's
vector math library, the sine and cosine from one exact reduction of the angle to a quarter
turn and a series; built with fedcore's native MLP step), 1.0-1.4 ns a value in all on the
reference machines against 2.2-2.3 for the same transform as whole-array numpy ufuncs, which
run where the native code cannot be built. Both follow the formula below in the buffer's
dtype; their values differ in the last bits of log, sin and cos (a few ulp). The bits are also cryptographically
strong -- the generator Opacus's ``secure_mode`` uses (torchcsprng's AES-CTR) -- where
mt19937's state can be reconstructed from its outputs.

Each stream is ``AES-128-CTR(key)`` over a zero counter: 2 ``ceil(P/2)`` 32-bit words
per draw, the first half ``k1`` and the second ``k2``; the values are
``sqrt(-2 ln((k1 + 1) / 2^32)) * std * (cos, sin)(2 pi k2 / 2^32)`` (cosines first, the
last sine dropped when ``P`` is odd). Radii reach 6.66 standard deviations (torch's
24-bit uniforms stop at 5.77). DP-SGD's keys derive from the site's secret
(:meth:`fedcore.components.DPStep.noise_key`): OS randomness by default, the seed only in
the reproducible research mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedcore.components import NOISE_KEY_BYTES
from fedcore.engine.native import NoiseStreams, gaussian_from_bits
from fedcore.engine.processes import usable_cpus

KEY_BYTES = NOISE_KEY_BYTES
_WORD = 4
_TWO_POW_32 = 2.0**-32
_ANGLE = 2.0 * math.pi * _TWO_POW_32
_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
#: the smallest noise buffer drawn ahead in a helper thread: a smaller one stays in the
#: training core's cache when drawn there, and moving it from the helper's core cost more
#: than drawing it (paper MLP, 3 copies: +35 % CPU a DP round; 30 copies, 1.85 MB: +3 % CPU,
#: -13 % wall)
AHEAD_MIN_BYTES = 1 << 20


_helper_allowed = True


def allow_helper(allowed: bool) -> None:
    """Whether :meth:`GaussianNoise.per_block` may draw ahead in a helper thread in this
    process. Worker processes that together keep every core busy turn it off
    (:mod:`fedcore.engine.runner`): there a helper only takes turns with the training thread,
    and the noise it writes crosses between cores (the paper's DP rounds, two such processes
    side by side: 0.315-0.319 CPU s a repeat-round with a helper, 0.307-0.308 without)."""
    global _helper_allowed
    _helper_allowed = allowed


class GaussianNoise:
    """Independent ``N(0, std^2)`` streams, one per row of an ``(S, P)`` buffer.

    :param keys: one 16-byte AES key per stream (row).
    :param width: ``P``, the values one draw writes per row.
    :param dtype: ``torch.float32`` or ``torch.float64`` (the transform runs in it).
    """

    def __init__(self, keys: Sequence[bytes], width: int, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in _NUMPY_DTYPE:
            raise ValueError(f"Gaussian noise is drawn in float32 or float64, not {dtype}")
        if any(len(key) != KEY_BYTES for key in keys):
            raise ValueError(f"every stream key must be {KEY_BYTES} bytes")
        self.width = width
        self.dtype = dtype
        self.half = -(-width // 2)
        self._keys = [bytes(key) for key in keys]
        #: the bytes of each stream's keystream drawn so far (a draw takes ``8 ceil(P/2)``)
        self.position = np.zeros(len(keys), dtype=np.int64)
        self._encryptors = [_stream(key, 0) for key in self._keys]
        self._handed_out = False  # whether the native step may have moved the positions
        self._zeros = bytes(2 * self.half * _WORD)
        # update_into wants block size - 1 spare bytes after its output (4 spare words).
        words = 2 * self.half + KEY_BYTES // _WORD
        #: the native transform (fedcore.engine.native), where it builds: one pass per row
        self._native = gaussian_from_bits()
        if self._native is not None:
            # Every row's keystream, then one call transforms the rows that draw.
            self._row_bits = np.empty((len(keys), words), dtype=np.uint32)
            self._row_streams = [memoryview(row).cast("B") for row in self._row_bits]
            self._row_bits_t = torch.from_numpy(self._row_bits.view(np.int32))
            self._every_row = list(range(len(keys)))
            return
        # One row of keystream at a time stays in cache.
        self._bits = np.empty(words, dtype=np.uint32)
        self._keystream = memoryview(self._bits).cast("B")
        # The angles of every row; the radii are computed in the output itself. Few
        # scratch bytes matter: the training step that reads the noise wants the cache.
        self._angle = np.empty((len(keys), self.half), dtype=_NUMPY_DTYPE[dtype])

    def draw(self, out: torch.Tensor, std: Sequence[float], rows: Sequence[bool] | np.ndarray | None = None) -> torch.Tensor:
        """Fill ``out`` (S, P), contiguous on the CPU, with row ``i`` ~ ``N(0, std[i]^2)``.

        :param out: the buffer to write (returned).
        :param std: one standard deviation per row.
        :param rows: which rows draw (default all); the others are zeroed and their
            streams do not advance, so a stream's values never depend on the other rows.
        """
        n_rows = len(self._encryptors)
        if out.shape != (n_rows, self.width) or out.dtype != self.dtype or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"noise goes into a contiguous CPU {self.dtype} tensor of shape ({n_rows}, {self.width})")
        drawing = None if rows is None else np.asarray(rows, dtype=bool)
        if drawing is not None and drawing.all():
            drawing = None  # every row draws: skip the per-row bookkeeping
        return self._fill(out, [float(s) for s in std], drawing)

    def native_streams(self, std: Sequence[float]) -> NoiseStreams:
        """The streams for the native step to draw from itself (:class:`~fedcore.engine.native.NoiseStreams`),
        at their current positions, which its draws advance; later draws here go on from there.

        :param std: one standard deviation per row.
        """
        self._handed_out = True
        keys = torch.frombuffer(bytearray(b"".join(self._keys)), dtype=torch.uint8).view(len(self._keys), KEY_BYTES)
        return NoiseStreams(keys, torch.from_numpy(self.position), tuple(float(s) for s in std))

    def _fill(self, out: torch.Tensor, std: list[float], drawing: np.ndarray | None) -> torch.Tensor:
        """:meth:`draw` on checked arguments (``drawing`` None when every row draws)."""
        if self._handed_out:
            # The native step drew from the streams: go on from where it left them.
            self._encryptors = [_stream(key, int(at)) for key, at in zip(self._keys, self.position, strict=True)]
            self._handed_out = False
        if drawing is None:
            self.position += 8 * self.half
        else:
            self.position[drawing] += 8 * self.half
        if self._native is not None:
            drawn = self._every_row if drawing is None else np.flatnonzero(drawing).tolist()
            encryptors, streams, zeros = self._encryptors, self._row_streams, self._zeros
            for i in drawn:
                encryptors[i].update_into(zeros, streams[i])
            self._native(self._row_bits_t, out, std, drawn)
            if drawing is not None:
                out.numpy()[~drawing] = 0.0
            return out
        values = out.numpy()
        h, rest, bits, angle = self.half, self.width - self.half, self._bits, self._angle
        radius = values[:, :h]
        keystream = self._keystream
        for i in range(len(self._encryptors)) if drawing is None else np.flatnonzero(drawing):
            self._encryptors[i].update_into(self._zeros, keystream)
            np.copyto(radius[i], bits[:h], casting="unsafe")
            np.multiply(bits[h : 2 * h], _ANGLE, out=angle[i], dtype=angle.dtype, casting="unsafe")
        if drawing is not None:
            # Rows that do not draw hold stale values; make them harmless until zeroed below.
            radius[~drawing] = 0.0
            angle[~drawing] = 0.0
        np.add(radius, 1.0, out=radius)
        np.multiply(radius, _TWO_POW_32, out=radius)  # uniform in (0, 1]
        np.log(radius, out=radius)
        variance = np.asarray(std, dtype=radius.dtype).reshape(-1, 1)
        np.multiply(radius, -2.0 * variance * variance, out=radius)
        np.sqrt(radius, out=radius)
        # Sines first (into the second half), while the first half still holds the radii.
        np.sin(angle[:, :rest], out=values[:, h:])
        np.multiply(values[:, h:], radius[:, :rest], out=values[:, h:])
        np.cos(angle, out=angle)
        np.multiply(radius, angle, out=radius)
        if drawing is not None:
            values[~drawing] = 0.0
        return out

    def per_step(self, std: Sequence[float], rows: np.ndarray, ahead: bool = True) -> Iterator[torch.Tensor]:
        """Step ``t``'s noise for every step of ``rows (S, steps)`` (which rows draw at each),
        each a fresh :meth:`draw` into an ``(S, P)`` buffer (:meth:`per_block` with
        blocks of one step).

        :param std: one standard deviation per row.
        :param rows: which rows draw at each step (a column per step).
        :param ahead: draw one step ahead in a helper thread.
        """
        for block in self.per_block(std, rows, [1] * rows.shape[1], ahead):
            yield block[0]

    def per_block(
        self, std: Sequence[float], rows: np.ndarray, blocks: Sequence[int], ahead: bool = True
    ) -> Iterator[torch.Tensor]:
        """The noise of consecutive blocks of steps of ``rows (S, steps)`` (which rows draw at
        each step): for a block of ``k`` steps a ``(k, S, P)`` view of a buffer (one of two while
        a helper draws ahead, else always the same, which stays in the core's cache), its
        step ``j`` a fresh :meth:`draw`.

        With ``ahead``, a buffer of at least :data:`AHEAD_MIN_BYTES`, more than one CPU for
        this process and the helper allowed (:func:`allow_helper`), a helper thread draws block
        ``i + 1``'s noise while the caller computes block ``i``: numpy's ufuncs, OpenSSL and the native transform run without
        the GIL, so the drawing overlaps the training on another core. The values are the
        same either way (each stream's draws happen in step order); the caller must be done
        with a block's buffer when it asks for the next block's.

        :param std: one standard deviation per row.
        :param rows: which rows draw at each step (a column per step).
        :param blocks: the blocks' numbers of steps, adding up to the steps of ``rows``.
        :param ahead: draw one block ahead in a helper thread.
        """
        n_rows, n_steps = len(self._encryptors), rows.shape[1]
        if sum(blocks) != n_steps or any(k < 1 for k in blocks):
            raise ValueError(f"blocks {list(blocks)} do not split {n_steps} steps")
        largest = max(blocks, default=0)
        small = largest * n_rows * self.width * self.dtype.itemsize < AHEAD_MIN_BYTES
        helper = ahead and _helper_allowed and not small and len(blocks) >= 2 and usable_cpus() >= 2
        # Drawn inline, every block goes into the same buffer, which stays in the core's cache;
        # a helper fills one while the caller reads the other.
        buffers = [torch.empty(largest, n_rows, self.width, dtype=self.dtype) for _ in range(2 if helper else 1)]
        # The checks and conversions of draw, once for every step.
        scales = [float(s) for s in std]
        rows = np.asarray(rows, dtype=bool)
        if rows.shape != (n_rows, n_steps):
            raise ValueError(f"rows must be ({n_rows}, steps), not {rows.shape}")
        every = rows.all(axis=0)
        drawing = [None if every[t] else rows[:, t] for t in range(n_steps)]
        starts = np.concatenate([[0], np.cumsum(blocks)]).tolist()

        def fill(i: int) -> torch.Tensor:
            out = buffers[i % len(buffers)][: blocks[i]]
            for j, t in enumerate(range(starts[i], starts[i + 1])):
                self._fill(out[j], scales, drawing[t])
            return out

        if not helper:
            for i in range(len(blocks)):
                yield fill(i)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="fedcore-noise") as drawer:
            pending = drawer.submit(fill, 0)
            for i in range(len(blocks)):
                out = pending.result()
                if i + 1 < len(blocks):
                    # Into the buffer of block i - 1, which the caller finished with.
                    pending = drawer.submit(fill, i + 1)
                yield out

    def sample(self, std: float) -> torch.Tensor:
        """One draw of a single-stream sampler as a new ``(P,)`` tensor."""
        out = torch.empty(1, self.width, dtype=self.dtype)
        return self.draw(out, [std])[0]


def _stream(key: bytes, at: int) -> Any:
    """An encryptor of AES-128-CTR under ``key`` from byte ``at`` of its keystream on (its
    counter block is ``at // 16``; the rest of that block is skipped)."""
    block, skip = divmod(at, 16)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    if skip:
        encryptor.update(bytes(skip))
    return encryptor


class DeviceGaussianNoise:
    """:class:`GaussianNoise`'s interface on an accelerator: one torch generator per stream
    on ``device`` (Philox on CUDA), seeded from the stream's key, drawing with
    ``normal_`` where the buffer lives -- drawing on the CPU and copying would bound a GPU
    step by the CPU's ~1.5 ns a value. The values are torch's, not the AES construction's,
    and Philox is not a cryptographic generator.

    :param keys: one 16-byte key per stream (its first 8 bytes seed the generator).
    :param width: ``P``, the values one draw writes per row.
    :param dtype: the buffer's dtype.
    :param device: where the buffer and the generators live.
    """

    def __init__(self, keys: Sequence[bytes], width: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.width = width
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device  # with its index: "cuda" is cuda:0
        self.generators = [torch.Generator(device=self.device) for _ in keys]
        self.reseed(keys)

    def reseed(self, keys: Sequence[bytes]) -> None:
        """Restart every stream from a new key, keeping the same generator objects (a CUDA
        graph that registered them then replays with the new streams)."""
        if len(keys) != len(self.generators):
            raise ValueError(f"{len(keys)} keys for {len(self.generators)} noise streams")
        for generator, key in zip(self.generators, keys, strict=True):
            generator.manual_seed(int.from_bytes(key[:8], "little"))

    def draw(self, out: torch.Tensor, std: Sequence[float], rows: Sequence[bool] | np.ndarray | None = None) -> torch.Tensor:
        """Fill ``out`` (S, P) on the device with row ``i`` ~ ``N(0, std[i]^2)``.

        :param out: the buffer to write (returned).
        :param std: one standard deviation per row.
        :param rows: which rows draw (default all); the others are zeroed and their
            generators do not advance.
        """
        if out.shape != (len(self.generators), self.width) or out.dtype != self.dtype or out.device != self.device:
            raise ValueError(f"noise goes into a {self.dtype} tensor of shape ({len(self.generators)}, {self.width}) on {self.device}")
        for i, generator in enumerate(self.generators):
            if rows is None or rows[i]:
                out[i].normal_(0.0, float(std[i]), generator=generator)
            else:
                out[i].zero_()
        return out

    def per_step(self, std: Sequence[float], rows: np.ndarray, ahead: bool = True) -> Iterator[torch.Tensor]:
        """:meth:`GaussianNoise.per_step` on the device (drawn in turn: the device works asynchronously already).

        :param std: one standard deviation per row.
        :param rows: which rows draw at each step (a column per step).
        :param ahead: ignored.
        """
        buffer = torch.empty(len(self.generators), self.width, dtype=self.dtype, device=self.device)
        for t in range(rows.shape[1]):
            yield self.draw(buffer, std, rows[:, t])


def add_noise(arrays: Mapping[str, np.ndarray], std: float, key: bytes) -> dict[str, np.ndarray]:
    """Each array plus i.i.d. ``N(0, std^2)`` per value, drawn in float64 from one stream
    keyed by ``key`` (arrays in their given order) and cast back to the array's dtype.

    :param arrays: named arrays (a model update, a sum of updates); not modified.
    :param std: the noise standard deviation.
    :param key: the 16-byte stream key.
    """
    sizes = [int(np.asarray(a).size) for a in arrays.values()]
    noise = GaussianNoise([key], max(1, sum(sizes)), torch.float64).sample(std).numpy()
    out, start = {}, 0
    for (name, array), size in zip(arrays.items(), sizes, strict=True):
        values = np.asarray(array)
        out[name] = (values.astype(np.float64) + noise[start : start + size].reshape(values.shape)).astype(values.dtype)
        start += size
    return out
