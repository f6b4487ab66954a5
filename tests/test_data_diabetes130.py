"""diabetes-130: the schema (ICD-9 groups, age bands, ID mappings), the download message, the real extract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore.errors import DataError
from fedcore.plugins.datasets.diabetes130 import (
    Diabetes130,
    Diabetes130Settings,
    age_midpoint,
    icd9_group,
    read_id_mappings,
)
from fedcore.plugins.datasets.partition import assign_splits

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "diabetes-130-us-hospitals"
DATA_FILE = DATA_DIR / "diabetic_data.csv.gz"
needs_data = pytest.mark.skipif(not DATA_FILE.is_file(), reason="../shared/data/diabetes-130-us-hospitals is absent")


def test_icd9_codes_fall_into_the_strack_groups() -> None:
    codes = pd.Series(["428", "250.83", "250", "786", "493", "V27", "E909", "820", "715", "599", "174", "8", None, "785"])
    assert icd9_group(codes).tolist()[:-2] == [
        "Circulatory", "Diabetes", "Diabetes", "Respiratory", "Respiratory", "Other", "Other",
        "Injury", "Musculoskeletal", "Genitourinary", "Neoplasms", "Other",
    ]  # fmt: skip
    assert pd.isna(icd9_group(codes).iloc[-2]) and icd9_group(codes).iloc[-1] == "Circulatory"


def test_age_bands_become_midpoints() -> None:
    assert age_midpoint(pd.Series(["[0-10)", "[70-80)", "[90-100)", None])).tolist()[:3] == [5.0, 75.0, 95.0]


def test_id_mapping_tables_are_read(tmp_path: Path) -> None:
    text = "admission_type_id,description\r\n1,Emergency\r\n6,NULL\r\n,\r\nadmission_source_id,description\r\n7, Emergency Room\r\n"
    (tmp_path / "IDs_mapping.csv").write_text(text)
    mappings = read_id_mappings(tmp_path / "IDs_mapping.csv")
    assert mappings == {"admission_type_id": {"1": "Emergency", "6": "NULL"}, "admission_source_id": {"7": "Emergency Room"}}


def test_without_a_path_the_error_says_where_to_download(tmp_path: Path, run_cli) -> None:
    with pytest.raises(DataError, match="archive.ics.uci.edu/dataset/296"):
        Diabetes130(Diabetes130Settings()).load(0)
    spec = tmp_path / "d.yaml"
    spec.write_text(f"name: d\ndata: {{use: diabetes-130, settings: {{path: {tmp_path / 'nope.csv.gz'}}}}}\n")
    result = run_cli("run", str(spec), "--out", str(tmp_path / "run"), "--no-progress")
    line = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in line
    assert "file not found" in line and "nope.csv.gz" in line and "archive.ics.uci.edu" in line
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_the_extract_is_refused(tmp_path: Path) -> None:
    pd.DataFrame({"patient_nbr": [1, 2], "readmitted": ["NO", "<30"], "age": ["[0-10)", "[10-20)"]}).to_csv(
        tmp_path / "other.csv", index=False
    )
    with pytest.raises(DataError, match="of the UCI diabetes-130 file is missing"):
        Diabetes130(Diabetes130Settings(path=str(tmp_path / "other.csv"))).load(0)


@pytest.fixture(scope="module")
def real() -> Diabetes130:
    return Diabetes130(Diabetes130Settings(path=str(DATA_FILE)))


@needs_data
def test_every_encounter_is_accounted_for_and_classes_match_the_source(real: Diabetes130) -> None:
    data = real.load(0)
    assert data.class_names == ["NO", ">30", "<30"]
    assert [s.name for s in data.sites] == ["emergency", "referral", "other"]
    counts = sum(np.bincount(np.concatenate([s.y_train, s.y_val, s.y_test]), minlength=3) for s in data.sites)
    assert counts.tolist() == [54864, 35545, 11357]  # SOURCE.md: NO, >30, <30
    sizes = data.report_sections["Data: sites and splits"]
    assert "| emergency | 57494 | 0 |" in sizes  # admission source 7
    assert data.max_rows_per_patient is not None and data.max_rows_per_patient > 1
    assert "payer_code_missing" in data.feature_names and "diag_1_Circulatory" in data.feature_names
    assert any(name.startswith("admission_type_id_1: Emergency") for name in data.feature_names)
    imputed = data.report_sections["Data: values imputed"]
    assert "| `race` | 'Caucasian' |" in imputed and "| 2273 |" in imputed


@needs_data
def test_no_patient_is_in_two_splits(real: Diabetes130) -> None:
    sites = real.raw_sites(0)
    splits = pd.concat(
        pd.DataFrame({"patient": s.frame["patient_nbr"], "split": assign_splits(s.frame, "patient_nbr", (0.8, 0.1, 0.1), 0, i)})
        for i, s in enumerate(sites)
    )
    assert len(splits) == 101_766
    assert splits["patient"].nunique() == 71_518
    assert splits.groupby("patient")["split"].nunique().max() == 1


@needs_data
@pytest.mark.slow
def test_binary_outcome_and_dropping_expired_are_reported() -> None:
    data = Diabetes130(
        Diabetes130Settings(path=str(DATA_FILE), outcome="within-30-days", drop_expired=True, partition={"method": "iid", "sites": 2})
    ).load(1)
    assert data.class_names == ["not <30", "<30"]
    dropped = data.report_sections["Data: rows dropped"]
    assert "expired in hospital" in dropped
    kept = sum(s.n_train + len(s.y_val) + len(s.y_test) for s in data.sites)
    removed = sum(int(line.split("|")[-2]) for line in dropped.splitlines()[2:])
    assert kept + removed == 101_766 and removed > 1000


@needs_data
@pytest.mark.slow
def test_the_spec_runs_from_the_repository_root(tmp_path: Path, run_cli) -> None:
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    overrides = ["repeats=1", "training.rounds=1", "sweep={}", "data.settings.oversample=random"]
    args = ["run", "specs/diabetes130.yaml", "--out", str(out), "--workers", "1", "--no-progress"]
    result = run_cli(*args, *(a for o in overrides for a in ("--set", o)), cwd=repo)
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "### Data: diabetes-130" in report and "| emergency | 57494 | 0 |" in report
    assert "RandomOverSampler" in report
