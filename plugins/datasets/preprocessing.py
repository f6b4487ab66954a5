"""Federated preprocessing: site summaries, the server's combine step, fitted scikit-learn steps.

The study imputes continuous columns with their mean and standardizes them,
imputes categorical columns with their mode and one-hot encodes them. Fitting
those steps needs statistics of the training rows; in a federation no site may
send rows, so each site sends a :class:`SiteSummary` (counts, sums, sums of
squares, category counts) and the server combines them with
:func:`combine_summaries`, which accepts nothing else. The result equals what
the same scikit-learn pipeline would learn from the pooled training rows
(``tests/test_data_preprocessing.py`` proves it), and
:func:`fitted_transformer` turns it into a ready scikit-learn
``ColumnTransformer`` that every site applies to its own rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fedcore.errors import DataError

OversampleMethod = Literal["none", "random", "smote"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContinuousSummary(_Message):
    """One continuous column at one site: enough to pool its mean and variance exactly."""

    count: int = Field(ge=0, description="non-missing values")
    missing: int = Field(ge=0)
    total: float
    total_of_squares: float


class CategoricalSummary(_Message):
    """One categorical column at one site: how often each category occurs."""

    counts: dict[str, int]
    missing: int = Field(ge=0)


class SiteSummary(_Message):
    """Site -> server: the only preprocessing message; it holds aggregates, never rows."""

    site: str
    rows: int = Field(ge=0)
    continuous: dict[str, ContinuousSummary]
    categorical: dict[str, CategoricalSummary]


class FederatedStatistics(_Message):
    """Server -> sites: the fitted imputation values, scaler moments and vocabularies.

    ``variance`` is the variance a ``StandardScaler`` placed after a mean
    ``SimpleImputer`` sees: imputed rows sit exactly at the mean, so it is the
    sum of squared deviations of the observed values divided by all rows.
    """

    sites: int
    rows: int
    mean: dict[str, float]
    variance: dict[str, float]
    mode: dict[str, str]
    vocabulary: dict[str, list[str]]
    observed: dict[str, int]
    """non-missing values per column, over all sites"""


#: the most model inputs one-hot encoding may produce (more would exhaust memory, not train)
MAX_FEATURES = 100_000


def _check_finite(value: float, column: str, where: str, what: str) -> float:
    """Refuse a statistic that overflowed float64 (values near 1e308 square to inf)."""
    if not math.isfinite(value):
        raise DataError(
            f"continuous column '{column}' has values too large to summarize: its {what} overflows",
            where=f"{where}: column {column}",
            hint="fix the outliers, or rescale the column (other units) so its values stay below about 1e150",
        )
    return value


def summarize_site(
    site: str, frame: pd.DataFrame, continuous: Sequence[str], categorical: Sequence[str], where: str | None = None
) -> SiteSummary:
    """Summarize one site's training rows (continuous columns numeric, categorical ones strings).

    Sums are float64 and checked: a column whose sum or sum of squares overflows is a
    :class:`DataError` naming it (``where`` names the site's file).
    """
    cont: dict[str, ContinuousSummary] = {}
    for column in continuous:
        values = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
        observed = values[~np.isnan(values)]
        with np.errstate(over="ignore", invalid="ignore"):
            total, squares = float(observed.sum()), float(np.dot(observed, observed))
        cont[column] = ContinuousSummary(
            count=int(observed.size),
            missing=int(values.size - observed.size),
            total=_check_finite(total, column, where or f"site {site}", "sum"),
            total_of_squares=_check_finite(squares, column, where or f"site {site}", "sum of squares"),
        )
    cat: dict[str, CategoricalSummary] = {}
    for column in categorical:
        series = frame[column]
        counts = series.value_counts(dropna=True)
        cat[column] = CategoricalSummary(
            counts={str(k): int(v) for k, v in counts.items()}, missing=int(series.isna().sum())
        )
    return SiteSummary(site=site, rows=len(frame), continuous=cont, categorical=cat)


def _most_frequent(counts: dict[str, int]) -> str:
    # scikit-learn's SimpleImputer breaks ties by the smallest value; so does this.
    best = max(counts.values())
    return min(k for k, v in counts.items() if v == best)


def _vocabulary(counts: dict[str, int], max_categories: int | None, min_count: int) -> list[str]:
    kept = [k for k, v in counts.items() if v >= min_count]
    if max_categories is not None and len(kept) > max_categories:
        kept = sorted(kept, key=lambda k: (-counts[k], k))[:max_categories]
    return sorted(kept)


def combine_summaries(
    summaries: Sequence[SiteSummary],
    max_categories: int | None = None,
    min_category_count: int = 1,
    where: str = "the sites' summaries",
) -> FederatedStatistics:
    """The server's step: pool the sites' summaries into imputation, scaling and vocabulary values.

    :param max_categories: keep only the most frequent categories of a column (the
        others encode as all zeros, as scikit-learn's ``handle_unknown="ignore"`` does).
    :param min_category_count: drop categories seen fewer times over all sites.
    :raises TypeError: for anything but :class:`SiteSummary` messages (rows never reach the server).
    """
    if not summaries:
        raise ValueError("no site summaries to combine")
    for summary in summaries:
        if type(summary) is not SiteSummary:
            raise TypeError(f"combine_summaries accepts only SiteSummary messages, got {type(summary).__name__}")
    first = summaries[0]
    for summary in summaries[1:]:
        if summary.continuous.keys() != first.continuous.keys() or summary.categorical.keys() != first.categorical.keys():
            raise ValueError(f"site {summary.site} summarized other columns than site {first.site}")
    rows = sum(s.rows for s in summaries)
    mean: dict[str, float] = {}
    variance: dict[str, float] = {}
    observed: dict[str, int] = {}
    for column in first.continuous:
        parts = [s.continuous[column] for s in summaries]
        count = sum(p.count for p in parts)
        observed[column] = count
        if count == 0:
            mean[column], variance[column] = math.nan, math.nan
            continue
        try:
            mu = math.fsum(p.total for p in parts) / count
            squares = math.fsum(p.total_of_squares for p in parts)
            spread = max(squares - count * mu * mu, 0.0) / rows
        except OverflowError:
            spread = math.inf
        mean[column] = _check_finite(mu, column, where, "pooled mean")
        variance[column] = _check_finite(spread, column, where, "pooled variance")
    mode: dict[str, str] = {}
    vocabulary: dict[str, list[str]] = {}
    for column in first.categorical:
        counts: dict[str, int] = {}
        for s in summaries:
            for category, n in s.categorical[column].counts.items():
                counts[category] = counts.get(category, 0) + n
        observed[column] = sum(counts.values())
        if not counts:
            mode[column], vocabulary[column] = "", []
            continue
        mode[column] = _most_frequent(counts)
        vocabulary[column] = _vocabulary(counts, max_categories, min_category_count)
        if mode[column] not in vocabulary[column]:
            vocabulary[column] = sorted([*vocabulary[column], mode[column]])
    return FederatedStatistics(
        sites=len(summaries),
        rows=rows,
        mean=mean,
        variance=variance,
        mode=mode,
        vocabulary=vocabulary,
        observed=observed,
    )


def check_columns_observed(stats: FederatedStatistics, where: str) -> None:
    """Refuse a column with no value at any site: nothing could impute it."""
    for column, count in stats.observed.items():
        if count == 0:
            raise DataError(
                f"column '{column}' is empty in every site's training rows",
                where=f"{where}: column {column}",
                hint=f"drop it (data.settings.drop_columns: [{column}]) or fill it in",
            )


def check_feature_count(stats: FederatedStatistics, continuous: Sequence[str], where: str) -> None:
    """Refuse a one-hot encoding wider than :data:`MAX_FEATURES` (a free-text or id column listed as categorical)."""
    width = len(continuous) + sum(len(v) for v in stats.vocabulary.values())
    if width > MAX_FEATURES:
        column = max(stats.vocabulary, key=lambda c: len(stats.vocabulary[c]))
        raise DataError(
            f"one-hot encoding would make {width} model inputs; column '{column}' alone has "
            f"{len(stats.vocabulary[column])} categories",
            where=f"{where}: column {column}",
            hint=f"drop it (data.settings.drop_columns: [{column}]) or set data.settings.max_categories",
        )


def unfitted_pipeline(
    continuous: Sequence[str], categorical: Sequence[str], vocabulary: dict[str, list[str]] | None = None
) -> ColumnTransformer:
    """The study's steps as one scikit-learn ``ColumnTransformer`` (not yet fitted).

    With ``vocabulary`` the one-hot categories are fixed; without it they are
    learned by ``fit`` (as a centralized pipeline would).
    """
    categories: list[list[str]] | str = [vocabulary[c] for c in categorical] if vocabulary is not None else "auto"
    steps = []
    if continuous:
        steps.append(
            (
                "continuous",
                Pipeline([("impute", SimpleImputer(strategy="mean")), ("scale", StandardScaler())]),
                list(continuous),
            )
        )
    if categorical:
        steps.append(
            (
                "categorical",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="most_frequent")),
                        (
                            "onehot",
                            OneHotEncoder(
                                categories=categories, handle_unknown="ignore", sparse_output=False, dtype=np.float32
                            ),
                        ),
                    ]
                ),
                list(categorical),
            )
        )
    return ColumnTransformer(steps, sparse_threshold=0.0, verbose_feature_names_out=False)


def fitted_transformer(
    stats: FederatedStatistics, continuous: Sequence[str], categorical: Sequence[str]
) -> ColumnTransformer:
    """A ``ColumnTransformer`` whose fitted values are exactly ``stats``.

    scikit-learn has no constructor for a fitted step, so the pipeline is fitted on
    a one-row prototype (every column at its mean or mode), which sets the
    imputers' values and every structural attribute through the public ``fit``;
    the scaler's variance, which one row cannot carry, is then set to the pooled value.
    """
    prototype = pd.DataFrame(
        {
            **{c: pd.Series([stats.mean[c]], dtype="float64") for c in continuous},
            **{c: pd.Series([stats.mode[c]], dtype="str") for c in categorical},
        }
    )
    transformer = unfitted_pipeline(continuous, categorical, stats.vocabulary)
    transformer.fit(prototype)
    if continuous:
        scaler: StandardScaler = transformer.named_transformers_["continuous"].named_steps["scale"]
        variance = np.array([stats.variance[c] for c in continuous], dtype=np.float64)
        scaler.var_ = variance
        # StandardScaler leaves constant columns unscaled (scale 1), as here.
        scale = np.sqrt(variance)
        scaler.scale_ = np.where(scale < 10 * np.finfo(np.float64).eps, 1.0, scale)
        scaler.n_samples_seen_ = stats.rows
    return transformer


def oversample(
    x: np.ndarray, y: np.ndarray, method: OversampleMethod, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Oversample the minority classes of one site's training split up to the majority count."""
    if method == "none":
        return x, y
    counts = np.bincount(y)
    present = counts[counts > 0]
    if len(present) < 2:  # a single-class site: nothing to balance
        return x, y
    if method == "random":
        from imblearn.over_sampling import RandomOverSampler

        sampler = RandomOverSampler(sampling_strategy="not majority", random_state=seed)
    else:
        from imblearn.over_sampling import SMOTE

        smallest = int(present.min())
        if smallest < 2:
            raise DataError(
                f"SMOTE needs at least 2 training rows of each class; one class has {smallest}",
                where=where,
                hint="use data.settings.oversample: random, or give the site more rows",
            )
        sampler = SMOTE(sampling_strategy="not majority", k_neighbors=min(5, smallest - 1), random_state=seed)
    x_res, y_res = sampler.fit_resample(x, y)
    return np.ascontiguousarray(x_res, dtype=np.float32), np.ascontiguousarray(y_res, dtype=np.int64)
