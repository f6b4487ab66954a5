"""Where secret randomness comes from: the OS CSPRNG by default, the seed only on request.

The spec's ``seed`` governs everything that should replicate (splits, initialization,
site order, non-private batch order). What protects privacy -- DP noise keys, DP
sampling, ledger commitment salts -- must not be predictable from a spec that the
report prints, so it is drawn from :func:`os.urandom` unless the run asks for the
research mode ``execution.reproducible_noise: true``, where it is derived from the
seed and a label naming its use (the report then says the run is not private against
anyone who knows the seed).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass


def secret_bytes(size: int, reproducible: bool, seed: int, *label: str | int) -> bytes:
    """``size`` secret bytes: fresh from the OS, or derived from ``seed`` and ``label``.

    :param size: how many bytes.
    :param reproducible: the run's ``execution.reproducible_noise``.
    :param seed: the spec's seed (read only in reproducible mode).
    :param label: what the bytes are for and whose they are, e.g. ``("dp-noise", arm, repeat,
        site, round)``; distinct labels give independent bytes in reproducible mode.
    """
    if size <= 0:
        raise ValueError("secret_bytes needs a positive size")
    if not reproducible:
        return os.urandom(size)
    material = json.dumps(["fedcore", seed, *label], separators=(",", ":")).encode()
    return hashlib.shake_256(material).digest(size)


@dataclass(frozen=True)
class Secrets:
    """The secret randomness of one training (one sweep arm, one repeat), handed to its plugins.

    :ivar reproducible: the run's ``execution.reproducible_noise``.
    :ivar seed: the training's seed (the spec's seed plus the repeat index).
    :ivar arm: what tells the arm apart (the engine passes a digest of the arm's resolved
        spec), so that arms never share noise, even in reproducible mode.
    """

    reproducible: bool = False
    seed: int = 0
    arm: str = ""

    def bytes(self, size: int, *label: str | int) -> bytes:
        """:func:`secret_bytes` for this training; ``label`` names the use and its owner,
        e.g. ``("site-noise", site, round)``."""
        return secret_bytes(size, self.reproducible, self.seed, self.arm, *label)


def derived_key(secret: bytes, size: int, *label: str | int) -> bytes:
    """``size`` bytes derived from ``secret`` for the use ``label`` names (SHAKE-256).

    One secret held by a party gives independent keys for each of its uses and rounds,
    so nothing but the secret itself has to be kept (or checkpointed) between rounds.
    """
    if size <= 0:
        raise ValueError("derived_key needs a positive size")
    material = json.dumps(["fedcore-key", *label], separators=(",", ":")).encode()
    return hashlib.shake_256(secret + material).digest(size)
