"""Shared fixtures: a tiny spec and a CLI runner that reports exit codes like the real command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_SPEC = """\
name: tiny
seed: 3
repeats: 1
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 400}}
model: {use: mlp, settings: {hidden: [16]}}
training: {rounds: 2, local_epochs: 1, batch_size: 32}
aggregator: {use: fedavg}
execution: {progress: false}
"""


@pytest.fixture
def tiny_spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPEC)
    return path


def fedcore_script() -> str:
    return str(Path(sys.executable).with_name("fedcore"))


@pytest.fixture
def run_cli(tmp_path: Path):
    """Run the installed `fedcore` command; returns CompletedProcess (text)."""
    import subprocess

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [fedcore_script(), *args], capture_output=True, text=True, env=full_env, cwd=cwd or tmp_path, timeout=300
        )

    return run
