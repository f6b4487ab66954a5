"""Where fedcore keeps what it builds once per machine (Fabric's binaries, the native code):
``FEDCORE_CACHE``, by default ``~/.cache/fedcore``; and the folder in which the processes of
one run share results that are pure functions of their inputs (:func:`shared_results`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (``FEDCORE_CACHE`` overrides ``~/.cache/fedcore``)."""
    return Path(os.environ.get("FEDCORE_CACHE", Path.home() / ".cache" / "fedcore"))


_SHARED: Path | None = None


def shared_results() -> Path | None:
    """The folder this run's processes share results in (the privacy plugins keep their noise
    calibrations there, so that a worker need not repeat its parent's), or None outside a run."""
    return _SHARED


def share_results_in(folder: Path | None) -> None:
    """Make ``folder`` this process's :func:`shared_results` (a worker, given its parent's)."""
    global _SHARED
    _SHARED = folder


@contextlib.contextmanager
def run_shared_results() -> Iterator[Path]:
    """A fresh private folder (mode 0700, removed after the block) as :func:`shared_results`
    within the block; a block inside another keeps the outer folder."""
    if _SHARED is not None:
        yield _SHARED
        return
    with tempfile.TemporaryDirectory(prefix="fedcore-run-") as folder:
        share_results_in(Path(folder))
        try:
            yield Path(folder)
        finally:
            share_results_in(None)
