"""ehr-csv: a generic loader for EHR tables in CSV or Parquet, one file per site or one shared file."""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
from pydantic import BaseModel, Field, field_validator, model_validator

from fedcore.components import Dataset, FederatedData
from fedcore.errors import DataError
from fedcore.plugins.datasets.partition import PartitionSettings, partition
from fedcore.plugins.datasets.pipeline import ColumnRoles, PreprocessingSettings, RawSite, build_federated_data
from fedcore.plugins.datasets.tables import (
    DEFAULT_MISSING,
    TableFormat,
    check_named_columns,
    infer_types,
    read_table,
    resolve_path,
)


class EHRCSVSettings(PreprocessingSettings):
    """Where the tables are, what their columns are, and how to cut them into sites."""

    path: str | None = Field(None, description="one table for all sites (with site_column or partition)")
    site_files: dict[str, str] | None = Field(None, description="site name -> its own table")
    format: TableFormat = "auto"
    delimiter: str = ","
    header: bool = True
    column_names: list[str] | None = Field(None, description="names of the columns, for files without a header")
    target: str
    target_map: dict[str, str] | None = Field(None, description="raw target value -> class (merge or rename classes)")
    classes: list[str] | None = Field(None, description="class order (default: sorted target values)")
    patient_id: str | None = Field(None, description="split by this id: no patient in two splits")
    site_column: str | None = None
    partition: PartitionSettings | None = None
    continuous: list[str] | None = Field(None, description="default: inferred from the data")
    categorical: list[str] | None = Field(None, description="default: inferred from the data")
    missing_values: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MISSING), description="markers read as missing in every column"
    )
    column_missing_values: dict[str, list[str | float]] = Field(
        default_factory=dict,
        description="per column, values that mean 'not measured' (a lab value of 0: {lab_value: [0]})",
    )
    drop_columns: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _per_column_missing(cls, data: Any) -> Any:
        """``missing_values`` may map columns to their own codes; the global markers then stay the default."""
        if isinstance(data, dict) and isinstance(data.get("missing_values"), dict):
            data = dict(data)
            per_column = data.pop("missing_values")
            glob = per_column.pop("*", None)
            data["column_missing_values"] = {**per_column, **data.get("column_missing_values", {})}
            if glob is not None:
                data["missing_values"] = glob
        return data

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str) -> str:
        if len(value) != 1:
            raise ValueError(f"delimiter must be one character, got {value!r} (write '\\t' for tab)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EHRCSVSettings:
        if (self.path is None) == (self.site_files is None):
            raise ValueError("give exactly one of 'path' (one table) and 'site_files' (one table per site)")
        if self.site_files is not None:
            if not self.site_files:
                raise ValueError("'site_files' is empty; map each site name to its file")
            if self.site_column or self.partition:
                raise ValueError("'site_column' and 'partition' apply to a single 'path', not to 'site_files'")
        elif (self.site_column is None) == (self.partition is None):
            raise ValueError(
                "a single 'path' needs exactly one of 'site_column' (its hospital column) or 'partition' (how to cut it)"
            )
        roles = [c for c in (self.target, self.patient_id, self.site_column) if c]
        features = [*(self.continuous or []), *(self.categorical or [])]
        both = sorted(set(self.continuous or []) & set(self.categorical or []))
        if both:
            raise ValueError(f"column '{both[0]}' is listed as both continuous and categorical")
        for column in roles:
            if column in features or column in self.drop_columns:
                raise ValueError(
                    f"column '{column}' is the target, patient id or site column; do not list it as a feature or drop it"
                )
        dropped_features = sorted(set(features) & set(self.drop_columns))
        if dropped_features:
            raise ValueError(f"column '{dropped_features[0]}' is both a feature and in drop_columns")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("'classes' lists a class twice")
        return self


def mask_column_codes(frame: pd.DataFrame, codes: dict[str, list[str | float]]) -> pd.DataFrame:
    """``frame`` with each column's own missing codes read as missing (NaN).

    A numeric column matches codes as numbers (``0`` and ``"0"`` both match ``0.0``); a
    text column matches them as text.
    """
    if not codes:
        return frame
    frame = frame.copy()
    for column, values in codes.items():
        series = frame[column]
        if pd.api.types.is_numeric_dtype(series):
            wanted = [float(v) for v in values if _is_number(v)]
        else:
            wanted = [str(v) for v in values]
        frame[column] = series.mask(series.isin(wanted))
    return frame


def _is_number(value: str | float) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class EHRCSV(Dataset):
    """Generic EHR tables: per-site files or one file with a site column or a partitioner.

    Column types come from the settings or are inferred (and the report says
    which); preprocessing is federated (see :mod:`fedcore.plugins.datasets.preprocessing`).
    """

    name: ClassVar[str] = "ehr-csv"
    Settings: ClassVar[type[BaseModel]] = EHRCSVSettings
    description: ClassVar[str] = "EHR tables from CSV/Parquet files, preprocessed federatedly"

    def will_oversample(self) -> bool:
        return self.settings.oversample != "none"  # type: ignore[attr-defined]

    def _read(self, text: str, setting: str) -> tuple[pd.DataFrame, str]:
        s: EHRCSVSettings = self.settings  # type: ignore[assignment]
        path = resolve_path(text, setting, hint=f"check {setting} (a relative path starts at the working directory)")
        frame = read_table(
            path,
            fmt=s.format,
            delimiter=s.delimiter,
            header=s.header,
            column_names=s.column_names,
            missing_values=s.missing_values,
        )
        named = {
            "patient_id": [s.patient_id] if s.patient_id else [],
            "site_column": [s.site_column] if s.site_column else [],
            "continuous": s.continuous or [],
            "categorical": s.categorical or [],
            "drop_columns": s.drop_columns,
            "missing_as_category": s.missing_as_category,
            "missing_values": list(s.column_missing_values),
            "partition.column": [s.partition.column] if s.partition and s.partition.column else [],
        }
        check_named_columns(frame, str(path), named, s.target)
        return mask_column_codes(frame, s.column_missing_values), str(path)

    def raw_sites(self, seed: int) -> list[RawSite]:
        """Every site's rows, as read (the target mapped), before preprocessing."""
        s: EHRCSVSettings = self.settings  # type: ignore[assignment]
        sites: list[RawSite] = []
        if s.site_files is not None:
            for name, text in s.site_files.items():
                frame, source = self._read(text, f"data.settings.site_files.{name}")
                sites.append(RawSite(name, frame, source))
        else:
            assert s.path is not None
            frame, source = self._read(s.path, "data.settings.path")
            if s.site_column is not None:
                sites = self._by_site_column(frame, source, s.site_column)
            else:
                assert s.partition is not None
                parts = partition(frame, s.partition, s.target, s.patient_id, seed, source)
                sites = [RawSite(name, part, f"{source} (site {name})") for name, part in parts.items()]
        if s.target_map is not None:
            sites = [self._map_target(site) for site in sites]
        return sites

    def _by_site_column(self, frame: pd.DataFrame, source: str, column: str) -> list[RawSite]:
        values = frame[column]
        if values.isna().any():
            raise DataError(
                f"{int(values.isna().sum())} row(s) have no value in the site column '{column}' "
                f"(first: data row {values.index[values.isna().to_numpy()][0] + 1})",
                where=f"{source}: column {column}",
                hint="fill in the site of those rows, or remove them from the file",
            )
        text = values.astype("str")
        return [RawSite(v, frame[(text == v).to_numpy()], f"{source} (site {v})") for v in sorted(text.unique())]

    def _map_target(self, site: RawSite) -> RawSite:
        s: EHRCSVSettings = self.settings  # type: ignore[assignment]
        assert s.target_map is not None
        raw = site.frame[s.target].astype("str")
        unmapped = raw.notna() & ~raw.isin(list(s.target_map))
        if unmapped.any():
            value = raw[unmapped].iloc[0]
            raise DataError(
                f"target value '{value}' is not in data.settings.target_map",
                where=f"{site.source}: column {s.target}",
                hint=f"map '{value}' to a class in target_map",
            )
        frame = site.frame.assign(**{s.target: raw.map(s.target_map)})
        return RawSite(site.name, frame, site.source, site.dropped)

    def roles(self, sites: list[RawSite]) -> ColumnRoles:
        """Declared column types, the rest inferred from each site's own values."""
        s: EHRCSVSettings = self.settings  # type: ignore[assignment]
        reserved = {c for c in (s.target, s.patient_id, s.site_column) if c} | set(s.drop_columns)
        declared = set(s.continuous or []) | set(s.categorical or [])
        columns = [str(c) for c in sites[0].frame.columns]
        undeclared = [c for c in columns if c not in reserved and c not in declared]
        for site in sites[1:]:
            missing = [c for c in columns if c not in site.frame.columns]
            if missing:
                raise DataError(
                    f"column '{missing[0]}' of {sites[0].source} is not in this file",
                    where=site.source,
                    hint="give every site's file the same columns, or list the extra ones in drop_columns",
                )
        inferred_cont, inferred_cat = infer_types([site.frame for site in sites], undeclared)
        continuous = {*(s.continuous or []), *inferred_cont}
        for column in s.missing_as_category:
            if column in continuous:
                raise DataError(
                    f"column '{column}' in data.settings.missing_as_category is continuous",
                    where="data.settings.missing_as_category",
                    hint=f"list '{column}' under categorical, or remove it from missing_as_category",
                )
        return ColumnRoles(
            target=s.target,
            continuous=(*(s.continuous or []), *inferred_cont),
            categorical=(*(s.categorical or []), *inferred_cat),
            patient_id=s.patient_id,
            inferred=tuple(undeclared),
        )

    def load(self, seed: int) -> FederatedData:
        s: EHRCSVSettings = self.settings  # type: ignore[assignment]
        sites = self.raw_sites(seed)
        return build_federated_data(sites, self.roles(sites), s.options(s.classes), seed)
