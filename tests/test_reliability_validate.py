"""`fedcore validate` agrees with `fedcore run`: a spec validate accepts runs, one it refuses is one line.

Valid inputs: every bundled spec, shrunk, and property-based (hypothesis) mutations of
a tiny spec and of a small CSV table. Whatever validate says, exit 1 (an internal
error) must never happen; when validate exits 0, a tiny run of the same input exits 0.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, SHARED_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corpus.make_corpus import BASE  # noqa: E402 - the corpus's valid spec, the mutations' start

TINY: dict[str, Any] = {**BASE, "name": "prop", "data": {"use": "synthetic-ehr", "settings": {"sites": 3, "patients_per_site": 120}}}

def _shrunk(path: Path) -> dict[str, Any] | None:
    spec = yaml.safe_load(path.read_text())
    spec["repeats"] = 1
    spec["training"] = {**spec.get("training", {}), "rounds": 1, "local_epochs": 1}
    if spec.get("baseline", {}).get("centralized"):
        spec["baseline"]["epochs"] = 1
    settings = spec["data"].setdefault("settings", {})
    if spec["data"]["use"] == "synthetic-ehr":
        settings["patients_per_site"] = 300
        settings.pop("site_sizes", None)
    elif spec["data"]["use"] == "diabetes-130":
        real = SHARED_DATA / "diabetes-130-us-hospitals" / "diabetic_data.csv.gz"
        if not real.is_file():
            return None
        settings["path"] = str(real)
    spec["sweep"] = {path_: values[:2] for path_, values in spec.get("sweep", {}).items()}
    spec["execution"] = {**spec.get("execution", {}), "progress": False, "workers": 1}
    return spec


BUNDLED = sorted((REPO / "specs").glob("*.yaml"))


def _agree(run_cli, tmp_path: Path, spec_text: str, cwd: Path | None = None) -> int:
    """Validate, then (when valid) run a tiny copy; assert they agree. Returns validate's exit code."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    checked = run_cli("validate", str(spec), cwd=cwd)
    assert checked.returncode in (0, 2), checked.stderr
    if checked.returncode == 2:
        assert checked.stderr.count("\n") == 1 and "Traceback" not in checked.stderr, checked.stderr
        return 2
    out = tmp_path / "run"
    ran = run_cli("run", str(spec), "--out", str(out), "--no-progress", cwd=cwd)
    assert ran.returncode == 0, f"validate said valid, run said: {ran.stderr}"
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_every_bundled_spec_shrunk_validates_and_runs(path: Path, tmp_path: Path, run_cli) -> None:
    spec = _shrunk(path)
    if spec is None:
        pytest.skip("needs the diabetes-130 data file")
    assert _agree(run_cli, tmp_path, yaml.safe_dump(spec)) == 0


#: leaves a mutation may change, with the kinds of values that probe them
PATHS = [
    "seed", "repeats", "training.rounds", "training.local_epochs", "training.batch_size", "training.learning_rate",
    "training.momentum", "training.weight_decay", "training.optimizer", "model.settings.hidden", "model.settings.dropout",
    "model.use", "aggregator.use", "data.settings.sites", "data.settings.label_noise", "data.settings.covariate_shift",
    "data.settings.split", "execution.engine", "baseline.centralized", "name",
]
VALUES = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 10**20, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True, width=64).filter(lambda v: abs(v) > 1e-3 or v == 0),
    st.sampled_from([0.001, 0.5, 0.99, 1.0, 1e300, -1e-9]),
    st.text(alphabet=string.ascii_letters + "-_ .\x00é", max_size=6),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 20), max_size=3),
    st.lists(st.floats(0, 1), min_size=3, max_size=3),
    st.sampled_from(["sgd", "adam", "fedprox", "logistic-regression", "sequential", "vectorized", "median"]),
)


def _set(spec: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=2))
def test_mutated_specs_validate_and_run_alike(mutations: list[tuple[str, Any]], tmp_path_factory, run_cli) -> None:
    spec = TINY
    for dotted, value in mutations:
        spec = _set(spec, dotted, value)
    text = yaml.safe_dump(spec, allow_unicode=True)
    _agree(run_cli, tmp_path_factory.mktemp("spec"), text)


def _table(seed: int = 0, n: int = 90) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(60, 12, n).round(1),
            "lab": rng.normal(1.0, 0.3, n).round(3),
            "code": rng.integers(1, 4, n),
            "sex": rng.choice(["F", "M"], n),
            "hospital": rng.choice(["A", "B"], n),
            "outcome": rng.choice(["no", "yes"], n),
        }
    ).astype(object)


CELLS = st.one_of(
    st.sampled_from(["inf", "-inf", "1e308", "1e400", "-1e300", "1e20", "NaN", "", "?", "x", "\x00", "é", '"', ",", "1e-320"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=4),
)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    edits=st.lists(st.tuples(st.integers(0, 89), st.sampled_from(list(_table().columns)), CELLS), min_size=1, max_size=3),
    drop=st.sampled_from([None, "age", "sex", "outcome", "hospital"]),
)
def test_mutated_tables_validate_and_run_alike(edits, drop, tmp_path_factory, run_cli) -> None:
    folder = tmp_path_factory.mktemp("table")
    frame = _table()
    for row, column, value in edits:
        frame.loc[row, column] = value
    if drop:
        frame = frame.drop(columns=drop)
    (folder / "t.csv").write_bytes(frame.to_csv(index=False).encode("utf-8", "surrogatepass"))
    spec = {
        **TINY,
        "data": {"use": "ehr-csv", "settings": {"path": "t.csv", "target": "outcome", "site_column": "hospital"}},
    }
    code = _agree(run_cli, folder, yaml.safe_dump(spec), cwd=folder)
    if code == 2:
        last = run_cli("validate", str(folder / "spec.yaml"), cwd=folder).stderr
        assert "t.csv" in last or "spec.yaml" in last, last
