"""ehr-csv from YAML on small tables the tests write, and every bad input as one line with exit code 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from fedcore.spec import build_components, load_experiment


def _table(n: int, seed: int, *, first_patient: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    patients = first_patient + rng.integers(0, n // 2, n)
    age = rng.normal(60, 12, n).round(1)
    age[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame(
        {
            "pid": patients,
            "age": age,
            "bmi": rng.normal(27, 4, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "admission_code": rng.choice([1, 2, 3, 7], n),
            "diagnosis": rng.choice(["circ", "resp", "diab", "?"], n),
            "outcome": rng.choice(["no", "late", "early"], n, p=[0.6, 0.3, 0.1]),
        }
    )


def _spec(settings: dict[str, Any], rounds: int = 1) -> str:
    return yaml.safe_dump(
        {
            "name": "csv",
            "data": {"use": "ehr-csv", "settings": settings},
            "model": {"use": "mlp", "settings": {"hidden": [8]}},
            "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 32},
            "baseline": {"centralized": True},
            "execution": {"progress": False},
        }
    )


def _load(settings: dict[str, Any], seed: int = 0):
    experiment = load_experiment(None, text=_spec(settings))
    return build_components(experiment.spec, experiment.plugins).dataset.load(seed)


@pytest.fixture
def two_sites(tmp_path: Path) -> dict[str, str]:
    files = {}
    for index, name in enumerate(("north", "south")):
        path = tmp_path / f"{name}.csv"
        _table(120 + 40 * index, index, first_patient=1000 * index).to_csv(path, index=False)
        files[name] = str(path)
    return files


def test_site_files_with_inferred_column_types(two_sites: dict[str, str]) -> None:
    data = _load({"site_files": two_sites, "target": "outcome", "patient_id": "pid"})
    assert [s.name for s in data.sites] == ["north", "south"]
    assert data.class_names == ["early", "late", "no"]
    types = data.report_sections["Data: column types"]
    assert "continuous (mean-imputed, standardized): `age` (inferred), `bmi` (inferred)" in types
    assert "`admission_code` (inferred)" in types.split("categorical")[1]  # few distinct codes: categorical
    assert "admission_code_7" in data.feature_names and "diagnosis_diab" in data.feature_names
    assert "diagnosis_?" not in data.feature_names  # '?' is a missing-value marker
    imputed = data.report_sections["Data: values imputed"]
    assert "`age`" in imputed and "`diagnosis`" in imputed
    sizes = data.report_sections["Data: sites and splits"]
    assert "| north | 120 | 0 |" in sizes and "| south | 160 | 0 |" in sizes
    assert data.max_rows_per_patient is not None and data.max_rows_per_patient >= 2
    total = sum(s.n_train + len(s.y_val) + len(s.y_test) for s in data.sites)
    assert total == 280


def test_one_parquet_file_with_a_site_column_and_declared_types(tmp_path: Path) -> None:
    frame = pd.concat([_table(100, 0).assign(hospital="A"), _table(90, 1, first_patient=500).assign(hospital="B")])
    frame.to_parquet(tmp_path / "all.parquet", index=False)
    data = _load(
        {
            "path": str(tmp_path / "all.parquet"),
            "site_column": "hospital",
            "target": "outcome",
            "patient_id": "pid",
            "classes": ["no", "late", "early"],
            "continuous": ["age", "bmi"],
            "categorical": ["sex", "admission_code", "diagnosis"],
            "missing_values": ["?"],
        }
    )
    assert [s.name for s in data.sites] == ["A", "B"]
    assert data.class_names == ["no", "late", "early"]
    assert "(inferred)" not in data.report_sections["Data: column types"]
    assert [s.n_train + len(s.y_val) + len(s.y_test) for s in data.sites] == [100, 90]


def test_headerless_file_partitioned_with_merged_classes(tmp_path: Path) -> None:
    _table(300, 2).to_csv(tmp_path / "raw.tsv", sep="\t", header=False, index=False)
    settings = {
        "path": str(tmp_path / "raw.tsv"),
        "header": False,
        "delimiter": "\t",
        "column_names": ["pid", "age", "bmi", "sex", "code", "dx", "y"],
        "target": "y",
        "target_map": {"no": "no", "late": "yes", "early": "yes"},
        "patient_id": "pid",
        "drop_columns": ["code"],
        "partition": {"method": "dirichlet", "sites": 2, "alpha": 5.0},
        "oversample": "random",
    }
    data = _load(settings)
    assert data.class_names == ["no", "yes"] and data.oversampled
    assert not any(name.startswith("code") for name in data.feature_names)
    for site in data.sites:
        counts = np.bincount(site.y_train)
        assert counts[0] == counts[1]
    again = _load(settings)
    np.testing.assert_array_equal(data.sites[1].x_train, again.sites[1].x_train)


def test_missing_as_category_keeps_missing_apart(two_sites: dict[str, str]) -> None:
    data = _load({"site_files": two_sites, "target": "outcome", "missing_as_category": ["diagnosis"]})
    assert "diagnosis_missing" in data.feature_names
    assert "`diagnosis`" not in data.report_sections["Data: values imputed"]


@pytest.mark.slow
def test_a_spec_runs_end_to_end_through_the_cli(two_sites: dict[str, str], tmp_path: Path, run_cli) -> None:
    spec = tmp_path / "csv.yaml"
    spec.write_text(_spec({"site_files": two_sites, "target": "outcome", "patient_id": "pid"}, rounds=2))
    result = run_cli("run", str(spec), "--out", str(tmp_path / "run"), "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "run" / "report.md").read_text()
    assert "### Data: values imputed" in report and "preprocessing summary of north" in report


# ------------------------------------------------------------------------ bad input

Case = Callable[[Path, dict[str, str]], dict[str, Any]]


def _missing_file(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    return {"site_files": {**files, "east": str(tmp / "east.csv")}, "target": "outcome"}


def _wrong_delimiter(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    _table(50, 3).to_csv(tmp / "semi.csv", sep=";", index=False)
    return {"site_files": {**files, "semi": str(tmp / "semi.csv")}, "target": "outcome"}


def _missing_target(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    return {"site_files": files, "target": "outcomes"}


def _site_without_rows(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    _table(5, 4).iloc[:0].to_csv(tmp / "empty.csv", index=False)
    return {"site_files": {**files, "empty": str(tmp / "empty.csv")}, "target": "outcome"}


def _text_in_continuous(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    frame = _table(60, 6).astype({"age": object})
    frame.loc[17, "age"] = "unknown"
    frame.to_csv(tmp / "texty.csv", index=False)
    return {"site_files": {**files, "texty": str(tmp / "texty.csv")}, "target": "outcome", "continuous": ["age", "bmi"]}


def _all_empty_column(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, path in files.items():
        pd.read_csv(path).assign(lab=np.nan).to_csv(tmp / f"{name}-lab.csv", index=False)
        out[name] = str(tmp / f"{name}-lab.csv")
    return {"site_files": out, "target": "outcome", "continuous": ["lab"]}


def _unknown_column(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    return {"site_files": files, "target": "outcome", "continuous": ["agee"]}


def _unknown_partition_column(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    return {"path": files["north"], "target": "outcome", "partition": {"method": "column", "column": "sx"}}


def _missing_site_value(tmp: Path, files: dict[str, str]) -> dict[str, Any]:
    frame = _table(60, 7).assign(hospital="A").astype({"hospital": object})
    frame.loc[3, "hospital"] = None
    frame.to_csv(tmp / "nosite.csv", index=False)
    return {"path": str(tmp / "nosite.csv"), "target": "outcome", "site_column": "hospital"}


BAD_INPUT: dict[str, tuple[Case, list[str]]] = {
    "missing file": (_missing_file, ["file not found", "east.csv", "data.settings.site_files.east"]),
    "wrong delimiter": (_wrong_delimiter, ["semi.csv", "semicolon-separated", "set data.settings.delimiter: ';'"]),
    "missing target column": (_missing_target, ["target column 'outcomes' is not in the file", "did you mean 'outcome'"]),
    "site with no rows": (_site_without_rows, ["empty.csv", "site 'empty' has no rows", "give the site data"]),
    "text in a continuous column": (
        _text_in_continuous,
        ["texty.csv: column age", "holds text 'unknown' (data row 18", "missing_values"],
    ),
    "all-empty column": (_all_empty_column, ["column lab", "empty in every site", "drop_columns: [lab]"]),
    "unknown column in settings": (_unknown_column, ["'agee' named in data.settings.continuous", "did you mean 'age'"]),
    "unknown partition column": (_unknown_partition_column, ["'sx' named in data.settings.partition.column", "did you mean 'sex'"]),
    "row without a site": (_missing_site_value, ["nosite.csv: column hospital", "no value in the site column"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_code_2(case: str, two_sites: dict[str, str], tmp_path: Path, run_cli) -> None:
    make, fragments = BAD_INPUT[case]
    spec = tmp_path / "bad.yaml"
    spec.write_text(_spec(make(tmp_path, two_sites)))
    out = tmp_path / "run"
    result = run_cli("run", str(spec), "--out", str(out), "--workers", "1", "--no-progress")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "Traceback" not in line
    for fragment in fragments:
        assert fragment in line
    assert " — " in line  # message — fix
    assert not out.exists()


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"target": "y"}, "give exactly one of 'path'"),
        ({"path": "a.csv", "target": "y"}, "needs exactly one of 'site_column'"),
        ({"path": "a.csv", "target": "y", "site_column": "s", "continuous": ["y"]}, "do not list it as a feature"),
        ({"site_files": {"a": "a.csv"}, "target": "y", "continuous": ["x"], "categorical": ["x"]}, "both continuous and categorical"),
        ({"site_files": {"a": "a.csv"}, "target": "y", "split": [0.5, 0.2, 0.2]}, "summing to 1"),
        ({"site_files": {"a": "a.csv"}, "target": "y", "delimiter": ";;"}, "one character"),
        ({"site_files": {"a": "a.csv"}, "target": "y", "oversampling": "random"}, "unknown key 'oversampling'"),
    ],
)
def test_bad_settings_fail_when_the_spec_loads(settings: dict[str, Any], fragment: str, tmp_path: Path, run_cli) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(_spec(settings))
    result = run_cli("validate", str(spec))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and fragment in line and "data.settings" in line


def test_per_column_missing_codes(tmp_path: Path) -> None:
    """``missing_values: {column: [codes]}``: a lab value of 0 means 'not measured' in that column only."""
    from fedcore.plugins.datasets.ehr_csv import EHRCSVSettings, mask_column_codes

    frame = _table(200, 3).assign(lab=lambda f: np.where(np.arange(len(f)) % 5 == 0, 0.0, 1.0 + np.arange(len(f))))
    frame.loc[frame.index % 7 == 0, "sex"] = "unknown"
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    settings = {"path": str(path), "partition": {"sites": 2}, "target": "outcome", "patient_id": "pid"}
    masked = mask_column_codes(pd.read_csv(path), {"lab": [0], "sex": ["unknown"], "admission_code": ["7"]})
    assert masked["lab"].isna().sum() == 40 and masked["sex"].isna().sum() == (frame["sex"] == "unknown").sum()
    assert masked["admission_code"].isna().sum() == (frame["admission_code"] == 7).sum()
    assert masked["bmi"].isna().sum() == 0  # other columns untouched (0 is a value there)
    parsed = EHRCSVSettings.model_validate({**settings, "missing_values": {"lab": [0], "*": ["?"]}})
    assert parsed.column_missing_values == {"lab": [0]} and parsed.missing_values == ["?"]
    default = EHRCSVSettings.model_validate({**settings, "missing_values": {"lab": [0]}})
    assert "NA" in default.missing_values  # the global markers stay the default
    with_codes = _load({**settings, "missing_values": {"lab": [0]}, "continuous": ["lab", "age", "bmi"]})
    without = _load({**settings, "continuous": ["lab", "age", "bmi"]})
    assert "`lab`" in with_codes.report_sections["Data: values imputed"]
    assert "`lab`" not in without.report_sections["Data: values imputed"]


def test_per_column_missing_codes_name_a_column_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    _table(60, 1).to_csv(path, index=False)
    experiment = load_experiment(
        None,
        text=_spec({"path": str(path), "partition": {"sites": 2}, "target": "outcome", "missing_values": {"lab_valu": [0]}}),
    )
    with pytest.raises(Exception) as info:
        build_components(experiment.spec, experiment.plugins).dataset.load(0)
    assert "column 'lab_valu' named in data.settings.missing_values is not in the file" in str(info.value)
