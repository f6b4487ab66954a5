"""The installed `fedcore` script itself: exit codes and one-line errors from a real process."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import TINY_SPEC, fedcore_script


def test_installed_script_reports_user_errors_in_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(TINY_SPEC.replace("rounds: 2", "rounds: -1"))
    result = subprocess.run([fedcore_script(), "run", str(spec), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "training.rounds" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_installed_script_runs_a_spec(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    result = subprocess.run(
        [fedcore_script(), "run", str(spec), "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "report.md").is_file()
