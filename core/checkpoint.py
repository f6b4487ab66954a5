"""The checkpoint format: a coordinator part and one part per site, per round, each written atomically.

After every completed round of one training (an arm and a repeat):

- the coordinator writes ``RUN/checkpoints/<training>/round-<NNNNNN>.pt`` (global
  model, aggregator state, round, ledger head, rounds written, which sites contributed);
- each site writes ``RUN/sites/<site>/checkpoints/<training>/round-<NNNNNN>.pt``
  (accountant, control variates, optimizer state where kept, generators, noise keys).

``RUN/sites/<site>/`` stands for that site's own disk: the coordinator's code never
reads it (:func:`load_coordinator` takes no site path), and a deployment keeps the
same layout on each hospital's machine. Each part is written to a temporary file
and renamed over its name (:func:`fedcore.rundir.atomic_write_bytes`), so a crash
leaves either the previous round's files or this round's, never half of one; a site's
part that records privacy spent is also flushed to the disk (see :data:`COORDINATOR_DURABLE`).

Resume starts from :func:`last_complete_round`: the last round whose coordinator part
*and* every expected site part exist and read back. Parts carry a format version and
the training's key; a part from another training or format is refused, not guessed at.

This module is the format only; the engine wiring (which state each party saves and
restores) is :mod:`fedcore.engine.resume` and ``FederatedRun`` (docs/reliability.md, "Resume").
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcore.rundir import atomic_write_bytes
from fedcore.types import Weights

FORMAT = "fedcore-checkpoint/1"
#: The coordinator's part is renamed into place whole but not flushed to the disk (a flush
#: costs about 7 ms a file): a process crash (kill -9, out of memory, an exception) loses
#: nothing written; a power cut may lose or empty the newest one, which then fails
#: :func:`_load`, and resume starts from an older complete round. A site's part that records
#: privacy spent is flushed before its update leaves the site (:func:`flush_to_disk`).
COORDINATOR_DURABLE = False
_ROUND_FILE = re.compile(r"^round-(\d{6})\.pt$")


class CheckpointError(Exception):
    """A checkpoint part that cannot be used (another training, another format, unreadable)."""


def training_key(mode: str, arm: str, repeat: int) -> str:
    """The folder name of one training's checkpoints (file-name safe)."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in arm)[:80] or "main"
    return f"{mode}-{slug}-r{repeat}"


@dataclass(frozen=True)
class CheckpointLayout:
    """Where one training's parts live in a run directory."""

    run_dir: Path
    key: str

    @property
    def coordinator_dir(self) -> Path:
        return self.run_dir / "checkpoints" / self.key

    def site_dir(self, site: str) -> Path:
        if not site or "/" in site or site in (".", ".."):
            raise ValueError(f"bad site name {site!r}")
        return self.run_dir / "sites" / site / "checkpoints" / self.key

    @staticmethod
    def file(round: int) -> str:
        if round < 0 or round > 999_999:
            raise ValueError(f"round {round} out of range")
        return f"round-{round:06d}.pt"


def weights_state(weights: Weights) -> dict[str, torch.Tensor]:
    """Model weights as tensors (a part holds tensors, numbers and strings only: ``weights_only`` loading)."""
    return {name: torch.from_numpy(np.array(array, copy=True)) for name, array in weights.arrays.items()}


def weights_from_state(state: Mapping[str, torch.Tensor]) -> Weights:
    """Inverse of :func:`weights_state` (names, dtypes and shapes kept)."""
    return Weights(arrays={name: tensor.numpy().copy() for name, tensor in state.items()})


def _dump(payload: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return buffer.getvalue()


def _load(path: Path, key: str, round: int, party: str) -> dict[str, Any]:
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} part")
    if payload.get("training") != key or payload.get("round") != round or payload.get("party") != party:
        raise CheckpointError(f"{path} belongs to {payload.get('training')} round {payload.get('round')}, not {key} round {round}")
    return payload["state"]


def save_coordinator(layout: CheckpointLayout, round: int, state: Mapping[str, Any]) -> Path:
    """Write the coordinator's part of ``round`` (tensors, numbers, strings, lists and dicts of them)."""
    path = layout.coordinator_dir / layout.file(round)
    atomic_write_bytes(path, _dump({"format": FORMAT, "training": layout.key, "round": round, "party": "coordinator", "state": dict(state)}), durable=COORDINATOR_DURABLE)
    return path


def save_site(layout: CheckpointLayout, site: str, round: int, state: Mapping[str, Any], durable: bool = True) -> Path:
    """Write one site's part of ``round`` into that site's own folder.

    :param durable: flush it to the disk now; False when the caller flushes many parts
        at once (:func:`flush_to_disk`).
    """
    path = layout.site_dir(site) / layout.file(round)
    atomic_write_bytes(path, _dump({"format": FORMAT, "training": layout.key, "round": round, "party": site, "state": dict(state)}), durable=durable)
    return path


@functools.cache
def _syncfs() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


def flush_to_disk(folder: Path) -> None:
    """Flush every file written on ``folder``'s file system to the disk: one ``syncfs`` for many parts.

    Cheaper than flushing each part and its directory (two flushes a part); Linux's
    ``syncfs``, else ``sync``.
    """
    syncfs = _syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def load_coordinator(layout: CheckpointLayout, round: int) -> dict[str, Any]:
    return _load(layout.coordinator_dir / layout.file(round), layout.key, round, "coordinator")


def load_site(layout: CheckpointLayout, site: str, round: int) -> dict[str, Any]:
    """A site's own part (read by that site only)."""
    return _load(layout.site_dir(site) / layout.file(round), layout.key, round, site)


def part_digest(layout: CheckpointLayout, round: int) -> str:
    """SHA-256 of the coordinator's part of ``round`` as written (what a ledger's ``resume`` entry commits to)."""
    return hashlib.sha256((layout.coordinator_dir / layout.file(round)).read_bytes()).hexdigest()


def site_rounds(layout: CheckpointLayout, site: str) -> list[int]:
    """The rounds a site holds parts of, oldest first (read by that site only)."""
    return sorted(_rounds_in(layout.site_dir(site)))


def _rounds_in(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for p in folder.iterdir() if (m := _ROUND_FILE.match(p.name)) and p.is_file()}


def last_complete_round(layout: CheckpointLayout, sites: Iterable[str]) -> int | None:
    """The last round whose coordinator part and every site's part exist and read back; None when none does.

    A round whose coordinator part is there but a site's is missing (the crash came
    between them) or damaged does not count; the round before it may.
    """
    sites = list(sites)
    candidates = _rounds_in(layout.coordinator_dir)
    for site in sites:
        candidates &= _rounds_in(layout.site_dir(site))
    for round in sorted(candidates, reverse=True):
        try:
            load_coordinator(layout, round)
            for site in sites:
                load_site(layout, site, round)
        except CheckpointError:
            continue
        return round
    return None


def prune(layout: CheckpointLayout, sites: Iterable[str], keep: int) -> None:
    """Delete all but the newest ``keep`` complete rounds' parts (older ones are never resumed from)."""
    last = last_complete_round(layout, sites)
    if last is None:
        return
    for folder in (layout.coordinator_dir, *(layout.site_dir(s) for s in sites)):
        for round in _rounds_in(folder):
            if round <= last - keep:
                (folder / layout.file(round)).unlink(missing_ok=True)
