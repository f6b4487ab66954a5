"""Shared fixtures: a tiny spec and a CLI runner that reports exit codes like the real command."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Ledger signing keys of test runs go to a throwaway directory, never the user's own key directory.
os.environ.setdefault("FEDCORE_KEYS_DIR", tempfile.mkdtemp(prefix="fedcore-test-keys-"))

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


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the `fedcore` command in this process (exit code, stdout, stderr as the real command gives).

    In-process keeps the suite fast (no interpreter and torch start-up per call);
    ``test_cli_subprocess`` checks the installed script itself.
    """
    from click.testing import CliRunner

    from fedcore.cli import cli

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(cwd or tmp_path)
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run
