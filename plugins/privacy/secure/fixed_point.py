"""Fixed-point vectors for secure aggregation: one flat int64 vector per site and round.

Every party must share a vector of the same public layout: the sample-weighted
delta (``n_i * delta_i``), then each extra tensor unweighted, then ``n_i`` and a
participation flag, so the revealed sum carries ``sum_i n_i delta_i``,
``sum_i extra_i``, ``total_samples`` and ``n_sites`` at once.

Encoding is ``round(x * 2**precision_bits)`` in float64, so each value of the
revealed sum is off from the exact sum by at most ``n_sites * 2**-(precision_bits + 1)``
(:func:`error_bound`); integers (``n_i``, the flag) are exact. Additive shares live
in the ring of int64 (wrap-around arithmetic), so the sum is exact modulo 2**64 and
correct as long as ``|sum| * 2**precision_bits < 2**63``; each party refuses a
vector whose values could break that (:func:`check_range`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedcore.types import ClientUpdate, SecureSum, Weights

#: the int64 ring holds |values| below 2**63
_RING_HALF = 2.0**63


@dataclass(frozen=True)
class VectorLayout:
    """Public layout of the shared vector: array names and shapes, no values."""

    delta: tuple[tuple[str, tuple[int, ...]], ...]
    extras: tuple[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], ...] = ()

    @classmethod
    def of(cls, template: Weights, extras: Mapping[str, Weights] | None = None) -> VectorLayout:
        """The layout of updates shaped like ``template`` carrying ``extras``."""
        return cls(
            delta=tuple((k, tuple(v.shape)) for k, v in template.arrays.items()),
            extras=tuple(
                (name, tuple((k, tuple(v.shape)) for k, v in w.arrays.items())) for name, w in sorted((extras or {}).items())
            ),
        )

    @property
    def length(self) -> int:
        """Values in the vector: the delta, the extras, ``n_samples`` and the participation flag."""
        sizes = [_size(s) for _, s in self.delta] + [_size(s) for _, arrays in self.extras for _, s in arrays]
        return int(sum(sizes)) + 2

    def digest(self) -> int:
        """A 63-bit fingerprint the parties compare before sharing (same layout, same round)."""
        text = json.dumps([self.delta, self.extras], separators=(",", ":"))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

    def matches(self, update: ClientUpdate) -> bool:
        return VectorLayout.of(update.delta, update.extras) == self

    def flatten(self, update: ClientUpdate | None) -> np.ndarray:
        """The float64 vector one site contributes; zeros (not participating) for ``None``."""
        if update is None:
            return np.zeros(self.length, dtype=np.float64)
        if not self.matches(update):
            raise ValueError(f"update of site {update.site} does not match the round's layout")
        n = float(update.n_samples)
        parts = [n * update.delta[k].astype(np.float64).ravel() for k, _ in self.delta]
        for name, arrays in self.extras:
            parts += [update.extras[name][k].astype(np.float64).ravel() for k, _ in arrays]
        parts.append(np.array([n, 1.0]))
        return np.concatenate(parts)

    def unflatten(self, round: int, vector: np.ndarray) -> SecureSum:
        """The :class:`SecureSum` a revealed float64 sum vector stands for."""
        if len(vector) != self.length:
            raise ValueError(f"sum has {len(vector)} values, layout needs {self.length}")
        offset = 0

        def take(shape: tuple[int, ...]) -> np.ndarray:
            nonlocal offset
            size = _size(shape)
            out = vector[offset : offset + size].reshape(shape)
            offset += size
            return out

        delta = {k: take(s) for k, s in self.delta}
        extras = {name: Weights(arrays={k: take(s) for k, s in arrays}) for name, arrays in self.extras}
        return SecureSum(
            round=round,
            weighted_delta_sum=Weights(arrays=delta),
            total_samples=int(round_half(vector[offset])),
            n_sites=int(round_half(vector[offset + 1])),
            extras_sum=extras,
        )


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if shape else 1


def round_half(value: float) -> float:
    return float(np.rint(value))


def max_abs_value(precision_bits: int, n_parties: int) -> float:
    """The largest |value| one party may share so that the sum of ``n_parties`` cannot wrap."""
    return _RING_HALF / (n_parties * 2.0**precision_bits) - 1.0


def check_range(vector: np.ndarray, precision_bits: int, n_parties: int) -> None:
    """Raise ``OverflowError`` when ``vector`` could make the fixed-point sum wrap around."""
    if not np.all(np.isfinite(vector)):
        raise OverflowError("the update holds NaN or infinite values")
    limit = max_abs_value(precision_bits, n_parties)
    largest = float(np.max(np.abs(vector))) if len(vector) else 0.0
    if largest > limit:
        raise OverflowError(
            f"a weighted update value {largest:.3g} exceeds the fixed-point range ±{limit:.3g} "
            f"of precision_bits={precision_bits} with {n_parties} parties"
        )


def encode(vector: np.ndarray, precision_bits: int) -> np.ndarray:
    """``round(vector * 2**precision_bits)`` as int64 (call :func:`check_range` first)."""
    return np.rint(vector.astype(np.float64) * 2.0**precision_bits).astype(np.int64)


def decode(encoded: np.ndarray, precision_bits: int) -> np.ndarray:
    """The float64 values of an int64 fixed-point vector."""
    return encoded.astype(np.float64) / 2.0**precision_bits


def reconstruct(shares: list[np.ndarray]) -> np.ndarray:
    """Add additive int64 shares in the ring Z_(2**64): wrap-around is the arithmetic, not an error."""
    total = np.zeros_like(shares[0], dtype=np.int64)
    with np.errstate(over="ignore"):
        for share in shares:
            total += share
    return total


def error_bound(precision_bits: int, n_sites: int) -> float:
    """Largest difference between a revealed sum value and the exact float64 sum."""
    return n_sites * 2.0 ** -(precision_bits + 1)


def sum_from_shares(round: int, layout: VectorLayout, shares: list[np.ndarray], precision_bits: int) -> SecureSum:
    """What the server learns: the parties' shares of the sum, added up and decoded."""
    return layout.unflatten(round, decode(reconstruct(shares), precision_bits))
