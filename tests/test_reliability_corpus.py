"""The malformed-input corpus (tests/corpus/): every case exits 2 with one line that points and fixes.

Each case is a committed file listed in its folder's ``cases.yaml`` (written by
``tests/corpus/make_corpus.py``) with its fault kind, exit code and message fragments.
The CLI runs in-process (``run_cli``), so the whole corpus takes seconds, not minutes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

CORPUS = Path(__file__).resolve().parent / "corpus"
SPEC_CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "specs" / "cases.yaml").read_text())
TABLE_CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "tables" / "cases.yaml").read_text())
#: seconds one case may take (in-process; the slowest are privacy budgets, calibrated in the preflight)
CASE_LIMIT_S = 60


@pytest.fixture(scope="module", autouse=True)
def _imports_done() -> None:
    """Load every plugin once before the cases are timed (importing torch is not a case's time)."""
    from fedcore.engine import runner  # noqa: F401
    from fedcore.registry import PluginManager

    PluginManager()

TABLE_SPEC = {
    "name": "corpus-table",
    "model": {"use": "mlp", "settings": {"hidden": [8]}},
    "training": {"rounds": 1, "local_epochs": 1, "batch_size": 16},
    "execution": {"progress": False, "workers": 1},
}


def test_the_corpus_is_big_and_varied() -> None:
    assert len(SPEC_CASES) >= 200 and len({c["kind"] for c in SPEC_CASES}) >= 25
    assert len(TABLE_CASES) >= 60 and len({c["kind"] for c in TABLE_CASES}) >= 25
    for case in (*SPEC_CASES, *TABLE_CASES):
        assert case["exit"] == 2 and case["expect"], case


def _check(result: Any, case: dict[str, Any], names: list[str], elapsed: float, out: Path) -> None:
    err = result.stderr
    assert result.returncode == case["exit"], f"{case['file']}: exit {result.returncode}: {err}"
    assert err.count("\n") == 1 and err.startswith("error: "), f"{case['file']}: not one line: {err!r}"
    assert "Traceback" not in err and " — " in err, f"{case['file']}: no fix: {err}"  # 'message — fix'
    assert any(name in err for name in names), f"{case['file']}: does not name the file: {err}"
    for fragment in case["expect"]:
        assert fragment in err, f"{case['file']}: {fragment!r} not in {err}"
    assert elapsed < CASE_LIMIT_S, f"{case['file']} took {elapsed:.1f} s"
    if case.get("out") is None:
        assert not out.exists(), f"{case['file']}: left a run directory"


@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("case", SPEC_CASES, ids=[c["file"] for c in SPEC_CASES])
def test_malformed_spec(case: dict[str, Any], tmp_path: Path, run_cli) -> None:
    spec = CORPUS / "specs" / case["file"]
    if "path" in case:
        spec = tmp_path / case["path"]
    if "symlink" in case:
        spec = tmp_path / "link.yaml"
        spec.symlink_to(spec if case["symlink"] == "self" else tmp_path / case["symlink"])
    out = tmp_path / "run"
    if case.get("out") == "file":
        out.write_text("x")
    elif case.get("out") == "nonempty":
        out.mkdir()
        (out / "keep").write_text("x")
    started = time.perf_counter()
    result = run_cli("run", str(spec), *case.get("args", []), "--out", str(out), "--no-progress")
    _check(result, case, [str(spec), spec.name, "--set", "--out"], time.perf_counter() - started, out)
    if case.get("out") == "nonempty":
        assert sorted(p.name for p in out.iterdir()) == ["keep"]


@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("case", TABLE_CASES, ids=[c["file"] for c in TABLE_CASES])
def test_malformed_table(case: dict[str, Any], tmp_path: Path, run_cli) -> None:
    spec = tmp_path / "spec.yaml"
    settings = {k: v for k, v in case["settings"].items() if v is not None}
    spec.write_text(yaml.safe_dump({**TABLE_SPEC, "data": {"use": "ehr-csv", "settings": settings}}))
    out = tmp_path / "run"
    started = time.perf_counter()
    result = run_cli("run", str(spec), "--out", str(out), "--no-progress", cwd=CORPUS / "tables")
    names = [case["file"], str(settings["path"]), f"{spec}:"]  # the table, or the spec for a settings error
    _check(result, case, names, time.perf_counter() - started, out)
