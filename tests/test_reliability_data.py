"""Sites with one class, stratified and fixed splits, and numbers a table must not hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from fedcore.errors import DataError
from fedcore.plugins.datasets.partition import assign_splits
from fedcore.spec import build_components, load_experiment


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(60, 12, n).round(1),
            "lab": rng.normal(1, 0.3, n).round(3),
            "sex": rng.choice(["F", "M"], n),
            "outcome": rng.choice(["no", "early", "late"], n, p=[0.6, 0.25, 0.15]),
        }
    )


def _spec(settings: dict[str, Any], rounds: int = 1) -> str:
    return yaml.safe_dump(
        {
            "name": "csv",
            "data": {"use": "ehr-csv", "settings": settings},
            "model": {"use": "mlp", "settings": {"hidden": [8]}},
            "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 16},
            "execution": {"progress": False},
        }
    )


def _load(settings: dict[str, Any], seed: int = 0):
    experiment = load_experiment(None, text=_spec(settings))
    return build_components(experiment.spec, experiment.plugins).dataset.load(seed)


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, str]:
    files = {}
    for index, name in enumerate(("north", "south")):
        _table(150, index).to_csv(tmp_path / f"{name}.csv", index=False)
        files[name] = str(tmp_path / f"{name}.csv")
    _table(60, 9).assign(outcome="no").to_csv(tmp_path / "mono.csv", index=False)
    files["mono"] = str(tmp_path / "mono.csv")
    return files


def test_a_single_class_site_trains_and_the_report_says_so(sites: dict[str, str], tmp_path: Path, run_cli) -> None:
    spec = tmp_path / "csv.yaml"
    spec.write_text(_spec({"site_files": sites, "target": "outcome", "oversample": "random"}, rounds=2))
    result = run_cli("run", str(spec), "--out", str(tmp_path / "run"), "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Single-class site(s): mono" in report
    rounds = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 2 and all('"site":2' in line.replace(" ", "") for line in rounds)  # mono evaluated each round


def test_all_rows_of_one_class_is_refused(tmp_path: Path) -> None:
    _table(80, 1).assign(outcome="no").to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(DataError, match="nothing to classify"):
        _load({"site_files": {"a": str(tmp_path / "a.csv")}, "target": "outcome"})


def test_stratified_split_keeps_each_class_share_in_every_split() -> None:
    rng = np.random.default_rng(0)
    labels = pd.Series(rng.choice(["a", "b", "c"], 1000, p=[0.7, 0.2, 0.1]))
    frame = pd.DataFrame({"y": labels, "pid": rng.integers(0, 100_000, 1000)})
    for patient in (None, "pid"):
        split = assign_splits(frame, patient, (0.8, 0.1, 0.1), 3, 0, labels)
        for name in ("a", "b", "c"):
            members = split[(labels == name).to_numpy()]
            shares = np.bincount(members, minlength=3) / len(members)
            assert np.allclose(shares, [0.8, 0.1, 0.1], atol=0.02), (patient, name, shares)
        if patient:
            assert frame.assign(s=split).groupby("pid")["s"].nunique().max() == 1


def test_a_fixed_split_seed_keeps_the_split_across_repeats(sites: dict[str, str]) -> None:
    settings = {"site_files": sites, "target": "outcome", "split": {"fractions": [0.6, 0.2, 0.2], "seed": 11}}
    first, second = _load(settings, seed=0), _load(settings, seed=1)
    for a, b in zip(first.sites, second.sites, strict=True):
        assert np.array_equal(a.y_test, b.y_test) and np.array_equal(a.x_test, b.x_test)
    free = {"site_files": sites, "target": "outcome", "split": [0.6, 0.2, 0.2]}
    assert not all(
        np.array_equal(a.y_test, b.y_test) for a, b in zip(_load(free, 0).sites, _load(free, 1).sites, strict=True)
    )
    assert "the same in every repeat (split seed 11)" in first.report_sections["Data: sites and splits"]
