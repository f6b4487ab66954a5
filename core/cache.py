"""Where fedcore keeps what it builds once per machine (Fabric's binaries, the native code):
``FEDCORE_CACHE``, by default ``~/.cache/fedcore``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (``FEDCORE_CACHE`` overrides ``~/.cache/fedcore``)."""
    return Path(os.environ.get("FEDCORE_CACHE", Path.home() / ".cache" / "fedcore"))
