"""diabetes-130: the UCI "Diabetes 130-US hospitals for years 1999-2008" extract (101,766 encounters).

The plugin knows the file's schema: ``?`` marks a missing value, the three ID
columns map to descriptions (``IDs_mapping.csv`` beside the data file), the
ICD-9 codes of ``diag_1..3`` are grouped into the nine groups of Strack et al.
(2014), the 10-year age bands become their midpoints, and ``patient_nbr``
repeats (splits are by patient). The public file has no hospital column, so
sites come from a partitioner; the default uses admission source as a proxy
(emergency room / referral / other).

Source: Clore, Cios, DeShazo, Strack (2014), doi:10.24432/C5230J, CC BY 4.0.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, model_validator

from fedcore.components import Dataset, FederatedData
from fedcore.errors import DataError
from fedcore.plugins.datasets.partition import PartitionSettings, partition
from fedcore.plugins.datasets.pipeline import ColumnRoles, PreprocessingSettings, RawSite, build_federated_data
from fedcore.plugins.datasets.tables import check_named_columns, read_table, resolve_path

DOWNLOAD_HINT = (
    "download diabetic_data.csv from https://archive.ics.uci.edu/dataset/296 "
    "(dataset_diabetes.zip) and set data.settings.path to it (.csv or .csv.gz)"
)
TARGET = "readmitted"
PATIENT = "patient_nbr"
ID_COLUMNS = ("admission_type_id", "discharge_disposition_id", "admission_source_id")
#: codes whose description says the value is unknown ("NULL", "Not Available", "Not Mapped", "Unknown/Invalid")
UNKNOWN_CODES = {
    "admission_type_id": {"5", "6", "8"},
    "discharge_disposition_id": {"18", "25", "26"},
    "admission_source_id": {"9", "15", "17", "20", "21"},
}
#: discharge dispositions of patients who died: they cannot be readmitted
EXPIRED_CODES = {"11", "19", "20", "21"}
DIAGNOSES = ("diag_1", "diag_2", "diag_3")
MEDICATIONS = (
    "metformin", "repaglinide", "nateglinide", "chlorpropamide", "glimepiride", "acetohexamide", "glipizide",
    "glyburide", "tolbutamide", "pioglitazone", "rosiglitazone", "acarbose", "miglitol", "troglitazone",
    "tolazamide", "examide", "citoglipton", "insulin", "glyburide-metformin", "glipizide-metformin",
    "glimepiride-pioglitazone", "metformin-rosiglitazone", "metformin-pioglitazone",
)  # fmt: skip
CONTINUOUS = (
    "age",
    "time_in_hospital",
    "num_lab_procedures",
    "num_procedures",
    "num_medications",
    "number_outpatient",
    "number_emergency",
    "number_inpatient",
    "number_diagnoses",
)
CATEGORICAL = (
    "race",
    "gender",
    *ID_COLUMNS,
    "payer_code",
    "medical_specialty",
    *DIAGNOSES,
    "max_glu_serum",
    "A1Cresult",
    *MEDICATIONS,
    "change",
    "diabetesMed",
)
OUTCOMES = {
    "three-class": ({"NO": "NO", ">30": ">30", "<30": "<30"}, ["NO", ">30", "<30"]),
    "within-30-days": ({"NO": "not <30", ">30": "not <30", "<30": "<30"}, ["not <30", "<30"]),
    "any": ({"NO": "NO", ">30": "readmitted", "<30": "readmitted"}, ["NO", "readmitted"]),
}


def _default_partition() -> PartitionSettings:
    return PartitionSettings(
        method="column",
        column="admission_source_id",
        groups={"emergency": ["7"], "referral": ["1", "2", "3"], "other": ["*"]},
    )


class Diabetes130Settings(PreprocessingSettings):
    """Where the file is, which outcome, how to form sites; plus the shared preprocessing settings."""

    path: str | None = Field(None, description="diabetic_data.csv or .csv.gz from the UCI archive")
    outcome: Literal["three-class", "within-30-days", "any"] = "three-class"
    partition: PartitionSettings = Field(default_factory=_default_partition)
    drop_expired: bool = Field(False, description="drop encounters that ended in death (never readmitted)")
    drop_columns: list[str] = Field(default_factory=lambda: ["weight"], description="weight is 97 % missing")
    missing_as_category: list[str] = Field(default_factory=lambda: ["payer_code", "medical_specialty"])
    max_categories: int | None = Field(30, ge=1)

    @model_validator(mode="after")
    def _columns(self) -> Diabetes130Settings:
        for column in (TARGET, PATIENT):
            if column in self.drop_columns:
                role = "target" if column == TARGET else "patient id"
                raise ValueError(f"'{column}' cannot be dropped (it is the {role})")
        for column in self.missing_as_category:
            if column not in CATEGORICAL:
                raise ValueError(f"missing_as_category: '{column}' is not a categorical column of diabetes-130")
        return self


def icd9_group(codes: pd.Series) -> pd.Series:
    """ICD-9 codes -> the nine diagnosis groups of Strack et al. (2014), Table 2; missing stays missing."""
    text = codes.astype("str")
    number = pd.to_numeric(text, errors="coerce").to_numpy()
    groups = np.select(
        [
            ((number >= 390) & (number <= 459)) | (number == 785),
            ((number >= 460) & (number <= 519)) | (number == 786),
            ((number >= 520) & (number <= 579)) | (number == 787),
            np.floor(number) == 250,
            (number >= 800) & (number <= 999),
            (number >= 710) & (number <= 739),
            ((number >= 580) & (number <= 629)) | (number == 788),
            (number >= 140) & (number <= 239),
        ],
        ["Circulatory", "Respiratory", "Digestive", "Diabetes", "Injury", "Musculoskeletal", "Genitourinary", "Neoplasms"],
        default="Other",
    )
    out = pd.Series(groups, index=codes.index, dtype="str")
    return out.mask(text.isna())


def age_midpoint(bands: pd.Series) -> pd.Series:
    """'[70-80)' -> 75.0; anything else is missing."""
    parts = bands.astype("str").str.extract(r"^\[(\d+)-(\d+)\)$").astype("float64")
    return (parts[0] + parts[1]) / 2


def read_id_mappings(path: Path) -> dict[str, dict[str, str]]:
    """The three stacked tables of ``IDs_mapping.csv``: column -> code -> description."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if not row or not row[0].strip():
                current = None
                continue
            key, description = row[0].strip(), ",".join(row[1:]).strip()
            if current is None:
                current = tables.setdefault(key, {})
            else:
                current[key] = description
    return tables


class Diabetes130(Dataset):
    """The UCI diabetes-130 extract: 3-class readmission (or binary), sites from a partitioner."""

    name: ClassVar[str] = "diabetes-130"
    Settings: ClassVar[type[BaseModel]] = Diabetes130Settings
    description: ClassVar[str] = "UCI Diabetes 130-US hospitals 1999-2008 (readmission), sites by proxy column"

    def will_oversample(self) -> bool:
        return self.settings.oversample != "none"  # type: ignore[attr-defined]

    def _read(self) -> tuple[pd.DataFrame, Path]:
        s: Diabetes130Settings = self.settings  # type: ignore[assignment]
        if s.path is None:
            raise DataError("diabetes-130 needs the path of the UCI file", where="data.settings.path", hint=DOWNLOAD_HINT)
        path = resolve_path(s.path, "data.settings.path", DOWNLOAD_HINT)
        text_columns = {c: "str" for c in (*CATEGORICAL, "age")}
        frame = read_table(path, missing_values=["?"], dtypes=text_columns)
        expected = [PATIENT, TARGET, *CONTINUOUS, *CATEGORICAL]
        absent = [c for c in expected if c not in frame.columns]
        if absent:
            raise DataError(
                f"column '{absent[0]}' of the UCI diabetes-130 file is missing ({len(absent)} missing in all)",
                where=str(path),
                hint=f"use the original diabetic_data.csv; {DOWNLOAD_HINT}",
            )
        named = {
            "drop_columns": s.drop_columns,
            "missing_as_category": s.missing_as_category,
            "partition.column": [s.partition.column] if s.partition.column else [],
        }
        check_named_columns(frame, str(path), named, TARGET)
        return frame, path

    def _features(self, frame: pd.DataFrame, mappings: dict[str, dict[str, str]]) -> pd.DataFrame:
        """The schema's meaning applied: age midpoints, ICD-9 groups, described and unknown ID codes."""
        s: Diabetes130Settings = self.settings  # type: ignore[assignment]
        out = {c: frame[c] for c in (PATIENT, *CONTINUOUS, *CATEGORICAL) if c not in s.drop_columns}
        out["age"] = age_midpoint(frame["age"])
        for column in DIAGNOSES:
            if column in out:
                out[column] = icd9_group(frame[column])
        for column in ID_COLUMNS:
            if column not in out:
                continue
            codes = frame[column].astype("str")
            descriptions = {code: f"{code}: {text}" for code, text in mappings.get(column, {}).items()}
            described = codes.map(descriptions).fillna(codes)
            out[column] = described.mask(codes.isin(list(UNKNOWN_CODES[column])), "Unknown")
        out["gender"] = frame["gender"].mask(frame["gender"] == "Unknown/Invalid")
        outcome_map, _ = OUTCOMES[s.outcome]
        out[TARGET] = frame[TARGET].map(outcome_map)
        return pd.DataFrame(out, index=frame.index)

    def raw_sites(self, seed: int) -> list[RawSite]:
        """The partitioned sites with the schema applied, before preprocessing."""
        s: Diabetes130Settings = self.settings  # type: ignore[assignment]
        frame, path = self._read()
        mapping_file = path.with_name("IDs_mapping.csv")
        mappings = read_id_mappings(mapping_file) if mapping_file.is_file() else {}
        parts = partition(frame, s.partition, TARGET, PATIENT, seed, str(path))
        sites = []
        for name, part in parts.items():
            dropped: dict[str, int] = {}
            unknown_target = part[TARGET].notna() & ~part[TARGET].isin(list(OUTCOMES[s.outcome][0]))
            if unknown_target.any():
                raise DataError(
                    f"readmitted has value '{part[TARGET][unknown_target].iloc[0]}' (expected NO, >30 or <30)",
                    where=f"{path}: column {TARGET}",
                    hint="use the original diabetic_data.csv",
                )
            if s.drop_expired:
                expired = part["discharge_disposition_id"].astype("str").isin(list(EXPIRED_CODES)).to_numpy()
                dropped["expired in hospital (discharge disposition 11, 19, 20, 21)"] = int(expired.sum())
                part = part[~expired]
            sites.append(RawSite(name, self._features(part, mappings), f"{path} (site {name})", dropped))
        return sites

    def load(self, seed: int) -> FederatedData:
        s: Diabetes130Settings = self.settings  # type: ignore[assignment]
        continuous = tuple(c for c in CONTINUOUS if c not in s.drop_columns)
        categorical = tuple(c for c in CATEGORICAL if c not in s.drop_columns)
        roles = ColumnRoles(target=TARGET, continuous=continuous, categorical=categorical, patient_id=PATIENT)
        about = (
            "UCI Diabetes 130-US hospitals 1999-2008 (Clore et al. 2014, CC BY 4.0). The file has no hospital "
            f"column: sites are a {s.partition.method} partition"
            + (f" by `{s.partition.column}`" if s.partition.column else "")
            + f". Outcome `{s.outcome}`. ICD-9 codes grouped as in Strack et al. (2014); age bands as midpoints; "
            "ID codes meaning NULL / not available / not mapped are one category `Unknown`."
        )
        _, classes = OUTCOMES[s.outcome]
        return build_federated_data(
            self.raw_sites(seed), roles, s.options(classes), seed, {"Data: diabetes-130": about}
        )
