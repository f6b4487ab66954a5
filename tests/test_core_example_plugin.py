"""A third-party plugin package, installed into a separate directory, is selected from YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_SPEC, fedcore_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fedcore-example-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site-packages")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
        check=True,
        timeout=300,
    )
    return target


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site)}


def test_example_plugin_is_listed_with_its_distribution(plugin_site: Path) -> None:
    out = subprocess.run([fedcore_script(), "plugins", "--json"], env=_env(plugin_site), capture_output=True, text=True, check=True)
    row = next(r for r in json.loads(out.stdout) if r["name"] == "fedavg-by-steps")
    assert row["distribution"] == "fedcore-example-plugin" and row["version"] == "0.1.0"
    assert row["status"] == "available"


def test_example_plugin_runs_from_yaml(plugin_site: Path, tmp_path: Path) -> None:
    spec = tmp_path / "example.yaml"
    spec.write_text(TINY_SPEC.replace("{use: fedavg}", "{use: fedavg-by-steps, settings: {server_learning_rate: 1.0}}"))
    run = subprocess.run(
        [fedcore_script(), "run", str(spec), "--out", str(tmp_path / "run"), "--workers", "1"],
        env=_env(plugin_site), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["arms"][0]["aggregator"]["use"] == "fedavg-by-steps"
    assert summary["arms"][0]["federated"]["aggregate"]["accuracy"]["mean"] > 0.4
    # Without the package on the path the same spec is refused with the choices listed.
    missing = subprocess.run([fedcore_script(), "validate", str(spec)], capture_output=True, text=True)
    assert missing.returncode == 2 and "unknown aggregator 'fedavg-by-steps'" in missing.stderr
