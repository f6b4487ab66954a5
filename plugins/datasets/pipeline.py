"""From raw per-site tables to :class:`~fedcore.components.FederatedData`, the study's way.

Every dataset plugin ends here: rows without a target are dropped (and
counted), each site splits its rows by patient, summarizes its training split,
the server combines the summaries, each site applies the fitted imputer,
scaler and one-hot encoder and oversamples its own training split. The report
sections say what each step did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcore.components import FederatedData, SiteData
from fedcore.errors import DataError
from fedcore.plugins.datasets.partition import SPLITS, assign_splits
from fedcore.plugins.datasets.preprocessing import (
    FederatedStatistics,
    OversampleMethod,
    SiteSummary,
    check_columns_observed,
    check_feature_count,
    combine_summaries,
    fitted_transformer,
    oversample,
    summarize_site,
)

MISSING_CATEGORY = "missing"


@dataclass(frozen=True)
class ColumnRoles:
    """What each column is. ``inferred`` lists the feature columns whose type was guessed."""

    target: str
    continuous: tuple[str, ...]
    categorical: tuple[str, ...]
    patient_id: str | None = None
    inferred: tuple[str, ...] = ()


@dataclass(frozen=True)
class RawSite:
    """One site's rows before preprocessing; ``source`` names its file for error messages.

    ``dropped`` counts rows a plugin already removed, by reason, so the report shows every row.
    """

    name: str
    frame: pd.DataFrame
    source: str
    dropped: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PreprocessOptions:
    """The study's preprocessing choices (plugins map their settings to these)."""

    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    stratify: bool = False
    split_seed: int | None = None
    oversample: OversampleMethod = "none"
    classes: tuple[str, ...] | None = None
    max_categories: int | None = None
    min_category_count: int = 1
    missing_as_category: tuple[str, ...] = ()


class SplitSettings(BaseModel):
    """How each site splits its rows: fractions, class balance, and whether repeats share one split.

    A spec may write the fractions alone (``split: [0.8, 0.1, 0.1]``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/validation/test fractions")
    stratify: bool = Field(False, description="keep each site's class balance in every split")
    seed: int | None = Field(
        None, ge=0, description="split with this seed in every repeat (default: each repeat's own seed)"
    )

    @model_validator(mode="before")
    @classmethod
    def _fractions_alone(cls, value: object) -> object:
        return {"fractions": value} if isinstance(value, list | tuple) else value

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0 or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {list(value)}")
        return value


class PreprocessingSettings(BaseModel):
    """Settings every EHR dataset plugin shares: the split and what preprocessing does."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    split: SplitSettings = Field(
        default_factory=SplitSettings, description="train/validation/test fractions, or {fractions, stratify, seed}"
    )
    oversample: OversampleMethod = Field("none", description="minority classes of each site's training split")
    max_categories: int | None = Field(None, ge=1, description="keep a column's most frequent categories only")
    min_category_count: int = Field(1, ge=1, description="drop categories seen fewer times over all sites")
    missing_as_category: list[str] = Field(
        default_factory=list, description="categorical columns where missing is its own category, not the mode"
    )

    def options(self, classes: list[str] | None = None) -> PreprocessOptions:
        return PreprocessOptions(
            split=self.split.fractions,
            stratify=self.split.stratify,
            split_seed=self.split.seed,
            oversample=self.oversample,
            classes=tuple(classes) if classes else None,
            max_categories=self.max_categories,
            min_category_count=self.min_category_count,
            missing_as_category=tuple(self.missing_as_category),
        )


def category_text(series: pd.Series) -> pd.Series:
    """Categorical values as text, missing kept missing; whole floats lose their ``.0`` (codes 1.0 -> "1")."""
    if pd.api.types.is_float_dtype(series):
        observed = series.dropna().to_numpy()
        # Only codes an int64 holds exactly lose their ".0"; 1e20 stays "1e+20", inf stays "inf".
        if len(observed) and np.all(np.abs(observed) < 2**53) and np.all(np.mod(observed, 1) == 0):
            series = series.astype("Int64")
    return series.astype("str")


def continuous_values(series: pd.Series, column: str, source: str) -> pd.Series:
    """A continuous column as float64; text, inf or nan text in it is a :class:`DataError` naming the row."""
    if pd.api.types.is_numeric_dtype(series):
        return _finite(series.astype("float64"), column, source)
    numbers = pd.to_numeric(series, errors="coerce")
    bad = numbers.isna() & series.notna()
    if bad.any():
        position = int(np.flatnonzero(bad.to_numpy())[0])
        value = str(series.iloc[position])[:40]
        raise DataError(
            f"continuous column '{column}' holds text '{value}' (data row {series.index[position] + 1}, "
            f"{int(bad.sum())} row(s) with text)",
            where=f"{source}: column {column}",
            hint=f"add '{value}' to data.settings.missing_values, or list '{column}' under categorical",
        )
    return _finite(numbers.astype("float64"), column, source)


def _check_inputs(x: np.ndarray, feature_names: Sequence[str], site: RawSite, split: str) -> None:
    """Model inputs must be finite float32: a value far from the training rows' scale overflows."""
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        column = feature_names[col]
        raise DataError(
            f"continuous column '{column}' holds a value too large for the model's inputs after scaling "
            f"({split} split, {int(bad[:, col].sum())} row(s))",
            where=f"{site.source}: column {column}",
            hint="fix the outliers, or rescale the column (other units) so its values stay below about 1e150",
        )


def _check_codes(series: pd.Series, column: str, source: str) -> None:
    """A numeric categorical column holds codes: inf, nan text or numbers past 2**53 are data errors."""
    if not pd.api.types.is_float_dtype(series):
        return
    array = series.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isnan(array) & ~(np.abs(array) < 2**53)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"categorical column '{column}' holds {array[position]:g} (data row {series.index[position] + 1}), "
            "not a category code",
            where=f"{source}: column {column}",
            hint=f"fix the value, or list '{column}' under continuous if it is a measurement",
        )


def _finite(values: pd.Series, column: str, source: str) -> pd.Series:
    """``values`` unchanged when every observed value is finite; inf (or 1e400, read as inf) is refused."""
    array = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isinf(array)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"continuous column '{column}' holds {array[position]} (data row {values.index[position] + 1}, "
            f"{int(bad.sum())} row(s) not finite)",
            where=f"{source}: column {column}",
            hint=f"fix or remove those values (or add their text to data.settings.missing_values), "
            f"or list '{column}' under categorical",
        )
    return values


def _normalized(site: RawSite, roles: ColumnRoles, options: PreprocessOptions) -> tuple[pd.DataFrame, dict[str, int]]:
    """Typed columns, rows without target or patient id removed (and counted)."""
    frame = site.frame
    dropped = dict(site.dropped)
    columns: dict[str, pd.Series] = {}
    for column in roles.continuous:
        columns[column] = continuous_values(frame[column], column, site.source)
    for column in roles.categorical:
        _check_codes(frame[column], column, site.source)
        values = category_text(frame[column])
        if column in options.missing_as_category:
            values = values.fillna(MISSING_CATEGORY)
        columns[column] = values
    columns["__target__"] = category_text(frame[roles.target])
    if roles.patient_id is not None:
        columns["__patient__"] = frame[roles.patient_id]
    out = pd.DataFrame(columns, index=frame.index)
    keep = out["__target__"].notna().to_numpy(copy=True)
    if (~keep).any():
        dropped[f"target '{roles.target}' missing"] = int((~keep).sum())
    if roles.patient_id is not None:
        no_id = out["__patient__"].isna().to_numpy() & keep
        if no_id.any():
            dropped[f"patient id '{roles.patient_id}' missing"] = int(no_id.sum())
        keep &= ~no_id
    return out[keep], dropped


def _classes(frames: Sequence[tuple[RawSite, pd.DataFrame]], roles: ColumnRoles, options: PreprocessOptions) -> list[str]:
    present = sorted(set().union(*(set(f["__target__"].unique()) for _, f in frames)))
    if options.classes is None:
        return present
    for site, frame in frames:
        unknown = sorted(set(frame["__target__"].unique()) - set(options.classes))
        if unknown:
            raise DataError(
                f"target '{roles.target}' has value '{unknown[0]}', which is not one of the classes "
                f"{', '.join(options.classes)}",
                where=f"{site.source}: column {roles.target}",
                hint="add it to data.settings.classes, or map it with data.settings.target_map",
            )
    return list(options.classes)


def _check_site(site: RawSite, frame: pd.DataFrame, roles: ColumnRoles) -> None:
    if len(frame) == 0:
        raise DataError(
            f"site '{site.name}' has no rows with a target",
            where=site.source,
            hint="give the site data, or remove it (file list, site column or partition)",
        )


def _split_counts_check(site: RawSite, split_of_row: np.ndarray) -> None:
    counts = np.bincount(split_of_row, minlength=3)
    for index, name in enumerate(SPLITS):
        if counts[index] == 0:
            raise DataError(
                f"site '{site.name}' has no rows in its {name} split ({len(split_of_row)} rows in all)",
                where=site.source,
                hint="give the site more rows or patients (an 80/10/10 split needs at least 10)",
            )


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _format_value(value: float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"'{value}'"


@dataclass(frozen=True)
class PreparedSite:
    """One site after normalizing and splitting: what it keeps, and the summary it sends."""

    site: RawSite
    frame: pd.DataFrame
    dropped: dict[str, int]
    parts: dict[str, pd.DataFrame]
    summary: SiteSummary


def normalize_site(site: RawSite, roles: ColumnRoles, options: PreprocessOptions) -> tuple[pd.DataFrame, dict[str, int]]:
    """Typed columns, rows without target or patient id removed (and counted)."""
    return _normalized(site, roles, options)


def prepare_site(
    site: RawSite, frame: pd.DataFrame, dropped: dict[str, int], roles: ColumnRoles, options: PreprocessOptions, seed: int, index: int
) -> PreparedSite:
    """At the site: check its rows, split them by patient, summarize the training split."""
    _check_site(site, frame, roles)
    split_seed = seed if options.split_seed is None else options.split_seed
    labels = frame["__target__"] if options.stratify else None
    patients = "__patient__" if roles.patient_id else None
    split_of_row = assign_splits(frame, patients, options.split, split_seed, index, labels)
    parts = {name: frame[split_of_row == i] for i, name in enumerate(SPLITS)}
    _split_counts_check(site, split_of_row)
    summary = summarize_site(site.name, parts["train"], roles.continuous, roles.categorical, site.source)
    return PreparedSite(site, frame, dropped, parts, summary)


def transform_site(
    prepared: PreparedSite,
    transformer: Any,
    roles: ColumnRoles,
    classes: Sequence[str],
    options: PreprocessOptions,
    seed: int,
    index: int,
) -> tuple[SiteData, np.ndarray, np.ndarray, int | None]:
    """At the site: apply the fitted transformer, oversample its training split.

    Returns the site's data, its training class counts before and after
    oversampling, and its largest number of training rows of one patient (None
    without a patient id).
    """
    class_index = {c: i for i, c in enumerate(classes)}
    features = [*roles.continuous, *roles.categorical]
    feature_names = [str(n) for n in transformer.get_feature_names_out()]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in SPLITS:
        part = prepared.parts[name]
        with np.errstate(over="ignore"):
            x = np.ascontiguousarray(transformer.transform(part[features]), dtype=np.float32)
        _check_inputs(x, feature_names, prepared.site, name)
        y = part["__target__"].map(class_index).to_numpy(dtype=np.int64, copy=True)
        arrays[name] = (x, y)
    x_train, y_train = arrays["train"]
    before = np.bincount(y_train, minlength=len(classes))
    seed_of_site = int(np.random.SeedSequence([seed, 0x0E5, index]).generate_state(1)[0])
    x_train, y_train = oversample(x_train, y_train, options.oversample, seed_of_site, prepared.site.source)
    after = np.bincount(y_train, minlength=len(classes))
    rows_per_patient = None
    if roles.patient_id is not None:
        rows_per_patient = int(prepared.parts["train"]["__patient__"].value_counts().max())
    data = SiteData(index, prepared.site.name, x_train, y_train, *arrays["validation"], *arrays["test"])
    return data, before, after, rows_per_patient


def build_federated_data(
    sites: Sequence[RawSite],
    roles: ColumnRoles,
    options: PreprocessOptions,
    seed: int,
    extra_sections: Mapping[str, str] | None = None,
) -> FederatedData:
    """Split, summarize, combine, transform and oversample; see the module docstring."""
    normalized = [(site, *_normalized(site, roles, options)) for site in sites]
    classes = _classes([(s, f) for s, f, _ in normalized], roles, options)
    if not classes:
        raise DataError(
            f"no row of any site has a target: column '{roles.target}' is empty",
            where=", ".join(dict.fromkeys(s.source for s in sites)),
            hint=f"fill in '{roles.target}', or set data.settings.target to the outcome column",
        )
    if len(classes) < 2:
        raise DataError(
            f"every row of every site has {roles.target} = '{classes[0] if classes else ''}': nothing to classify",
            where=", ".join(dict.fromkeys(s.source for s in sites)),
            hint=f"check data.settings.target ('{roles.target}') and target_map; the federation needs two classes",
        )
    prepared = [prepare_site(site, frame, dropped, roles, options, seed, i) for i, (site, frame, dropped) in enumerate(normalized)]
    summaries = [p.summary for p in prepared]
    splits = [p.parts for p in prepared]
    sources = ", ".join(dict.fromkeys(s.source for s in sites))
    stats = combine_summaries(summaries, options.max_categories, options.min_category_count, where=sources)
    check_columns_observed(stats, sources)
    check_feature_count(stats, roles.continuous, sources)
    transformer = fitted_transformer(stats, roles.continuous, roles.categorical)
    feature_names = [str(n) for n in transformer.get_feature_names_out()]
    site_data: list[SiteData] = []
    balance_rows: list[list[object]] = []
    max_rows_per_patient = 0
    for index, p in enumerate(prepared):
        data, before, after, rows_per_patient = transform_site(p, transformer, roles, classes, options, seed, index)
        shown = (f"{b} → {a}" if options.oversample != "none" else f"{b}" for b, a in zip(before, after, strict=True))
        balance_rows.append([p.site.name, *shown])
        max_rows_per_patient = max(max_rows_per_patient, rows_per_patient or 0)
        site_data.append(data)
    sections = _sections(normalized, splits, site_data, stats, roles, options, classes, balance_rows, feature_names)
    sections.update(extra_sections or {})
    return FederatedData(
        sites=site_data,
        feature_names=feature_names,
        class_names=classes,
        report_sections=sections,
        released_statistics=released_summaries(summaries),
        max_rows_per_patient=max_rows_per_patient if roles.patient_id is not None else None,
        oversampled=options.oversample != "none",
    )


def released_summaries(summaries: Sequence[SiteSummary]) -> dict[str, Any]:
    """The preprocessing summaries as released (recorded on the ledger), by name."""
    return {f"preprocessing summary of {s.site}": s.model_dump(mode="json") for s in summaries}


def _sections(
    normalized: Sequence[tuple[RawSite, pd.DataFrame, dict[str, int]]],
    splits: Sequence[dict[str, pd.DataFrame]],
    site_data: Sequence[SiteData],
    stats: FederatedStatistics,
    roles: ColumnRoles,
    options: PreprocessOptions,
    classes: Sequence[str],
    balance_rows: Sequence[Sequence[object]],
    feature_names: Sequence[str],
) -> dict[str, str]:
    rows = []
    for (site, frame, dropped), parts, data in zip(normalized, splits, site_data, strict=True):
        patients = frame["__patient__"].nunique() if roles.patient_id else len(frame)
        rows.append(
            [
                site.name,
                len(frame) + sum(dropped.values()),
                sum(dropped.values()),
                len(parts["train"]),
                len(parts["validation"]),
                len(parts["test"]),
                patients,
                data.n_train,
            ]
        )
    split_text = "/".join(f"{round(100 * f)}" for f in options.split)
    split_text += ", stratified by class" if options.stratify else ""
    split_text += f", the same in every repeat (split seed {options.split_seed})" if options.split_seed is not None else ""
    sizes = _markdown_table(
        ["site", "rows read", "dropped", "train", "validation", "test", "patients", "train rows used"], rows
    )
    sizes += (
        f"\n\nSplit {split_text} by "
        + (f"patient (`{roles.patient_id}`, keyed hash: no patient in two splits)" if roles.patient_id else "row")
        + "; preprocessing statistics come from the training splits only."
    )
    dropped_rows = [[site.name, reason, n] for site, _, dropped in normalized for reason, n in dropped.items() if n]
    dropped_text = _markdown_table(["site", "reason", "rows"], dropped_rows) if dropped_rows else "No rows were dropped."
    inferred = set(roles.inferred)

    def listed(columns: Sequence[str]) -> str:
        return ", ".join(f"`{c}`" + (" (inferred)" if c in inferred else "") for c in columns) or "none"

    types = "\n".join(
        [
            f"- target: `{roles.target}` with classes {', '.join(f'`{c}`' for c in classes)}",
            f"- patient id: `{roles.patient_id}`" if roles.patient_id else "- patient id: none (each row is a patient)",
            f"- continuous (mean-imputed, standardized): {listed(roles.continuous)}",
            f"- categorical (mode-imputed, one-hot): {listed(roles.categorical)}",
            f"- missing as its own category `{MISSING_CATEGORY}`: {listed(options.missing_as_category)}",
            f"- {len(feature_names)} model inputs after one-hot encoding",
        ]
    )
    if inferred:
        types += "\n\nInferred: text columns and numeric columns with at most 10 distinct values are categorical."
    imputed_rows = []
    for column in [*roles.continuous, *roles.categorical]:
        if column in options.missing_as_category:
            continue
        per_site = [int(frame[column].isna().sum()) for _, frame, _ in normalized]
        if any(per_site):
            fill = stats.mean[column] if column in stats.mean else stats.mode[column]
            imputed_rows.append([f"`{column}`", _format_value(fill), *per_site, sum(per_site)])
    site_names = [site.name for site, _, _ in normalized]
    imputed = (
        _markdown_table(["column", "filled with", *site_names, "total"], imputed_rows)
        if imputed_rows
        else "No value was missing."
    )
    imputed += "\n\nCounts cover all three splits; fill values are pooled training-split means and modes."
    method = {"none": "none", "random": "RandomOverSampler", "smote": "SMOTE"}[options.oversample]
    balance = _markdown_table(["site", *classes], balance_rows)
    balance += f"\n\nTraining split only; oversampling: {method}. Validation and test splits are never resampled."
    single = [data.name for data in site_data if np.count_nonzero(np.bincount(data.y_train)) == 1]
    if single:
        balance += (
            f"\n\nSingle-class site(s): {', '.join(single)} saw one class in training; each trains and sends its "
            "update like any other site (nothing is oversampled there)."
        )
    return {
        "Data: sites and splits": sizes,
        "Data: rows dropped": dropped_text,
        "Data: column types": types,
        "Data: values imputed": imputed,
        "Data: class balance": balance,
    }
