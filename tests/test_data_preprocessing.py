"""Federated preprocessing: combined site summaries equal pooled statistics; only summaries reach the server."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.impute import SimpleImputer

from fedcore.errors import DataError
from fedcore.plugins.datasets.pipeline import ColumnRoles, PreprocessOptions, RawSite, build_federated_data
from fedcore.plugins.datasets.preprocessing import (
    CategoricalSummary,
    SiteSummary,
    check_columns_observed,
    combine_summaries,
    fitted_transformer,
    oversample,
    summarize_site,
    unfitted_pipeline,
)

CONTINUOUS = ["age", "creatinine", "stay"]
CATEGORICAL = ["sex", "diagnosis"]


def _site_frame(rng: np.random.Generator, n: int, shift: float) -> pd.DataFrame:
    def holes(values: np.ndarray, share: float) -> np.ndarray:
        values = values.astype(object if values.dtype.kind in "OU" else np.float64)
        values[rng.random(n) < share] = None if values.dtype == object else np.nan
        return values

    return pd.DataFrame(
        {
            "age": holes(rng.normal(60 + shift, 15, n), 0.1),
            "creatinine": holes(rng.lognormal(shift / 10, 0.4, n) * 1e3, 0.3),
            "stay": holes(rng.integers(1, 15, n).astype(float), 0.0),
            "sex": pd.array(holes(rng.choice(np.array(["F", "M"], dtype=object), n), 0.05), dtype="str"),
            "diagnosis": pd.array(
                holes(rng.choice(np.array(["circ", "resp", "diab", "inj"], dtype=object), n, p=[0.4, 0.3, 0.2, 0.1]), 0.1),
                dtype="str",
            ),
        }
    )


@pytest.fixture
def site_frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(7)
    return [_site_frame(rng, n, shift) for n, shift in ((500, 0.0), (1300, 8.0), (90, -5.0))]


def test_combined_statistics_equal_the_pooled_pipeline(site_frames: list[pd.DataFrame]) -> None:
    summaries = [summarize_site(f"s{i}", f, CONTINUOUS, CATEGORICAL) for i, f in enumerate(site_frames)]
    stats = combine_summaries(summaries)
    federated = fitted_transformer(stats, CONTINUOUS, CATEGORICAL)

    pooled = pd.concat(site_frames, ignore_index=True)
    reference = unfitted_pipeline(CONTINUOUS, CATEGORICAL).fit(pooled)

    np.testing.assert_allclose(
        federated.named_transformers_["continuous"]["impute"].statistics_,
        reference.named_transformers_["continuous"]["impute"].statistics_,
        rtol=1e-12,
    )
    assert list(federated.named_transformers_["categorical"]["impute"].statistics_) == list(
        reference.named_transformers_["categorical"]["impute"].statistics_
    )
    ours, theirs = federated.named_transformers_["continuous"]["scale"], reference.named_transformers_["continuous"]["scale"]
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-9)
    np.testing.assert_allclose(ours.scale_, theirs.scale_, rtol=1e-9)
    assert ours.n_samples_seen_ == theirs.n_samples_seen_ == len(pooled)
    ours_cats = federated.named_transformers_["categorical"]["onehot"].categories_
    theirs_cats = reference.named_transformers_["categorical"]["onehot"].categories_
    assert [list(c) for c in ours_cats] == [list(c) for c in theirs_cats]
    assert list(federated.get_feature_names_out()) == list(reference.get_feature_names_out())
    np.testing.assert_allclose(federated.transform(pooled), reference.transform(pooled), rtol=1e-9, atol=1e-12)
    # The means themselves, against numpy on the pooled rows.
    np.testing.assert_allclose(stats.mean["age"], np.nanmean(pooled["age"].to_numpy(dtype=float)), rtol=1e-12)
    assert stats.rows == len(pooled)


def test_the_server_accepts_only_site_summaries(site_frames: list[pd.DataFrame]) -> None:
    summary = summarize_site("s0", site_frames[0], CONTINUOUS, CATEGORICAL)
    with pytest.raises(TypeError, match="only SiteSummary"):
        combine_summaries([summary, site_frames[1]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="only SiteSummary"):
        combine_summaries([summary.model_dump()])  # type: ignore[list-item]


def test_a_site_summary_is_frozen_and_cannot_carry_rows(site_frames: list[pd.DataFrame]) -> None:
    summary = summarize_site("s0", site_frames[0], CONTINUOUS, CATEGORICAL)
    with pytest.raises(ValidationError):
        summary.rows = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        SiteSummary.model_validate({**summary.model_dump(), "values": [[1.0, 2.0]]})
    assert set(summary.model_dump()) == {"site", "rows", "continuous", "categorical"}


def test_modes_break_ties_like_scikit_learn() -> None:
    frames = [
        pd.DataFrame({"c": pd.array(["b", "b", "a"], dtype="str")}),
        pd.DataFrame({"c": pd.array(["a", "c"], dtype="str")}),
    ]
    stats = combine_summaries([summarize_site(f"s{i}", f, [], ["c"]) for i, f in enumerate(frames)])
    pooled = pd.concat(frames, ignore_index=True)
    expected = SimpleImputer(strategy="most_frequent").fit(pooled).statistics_[0]
    assert stats.mode["c"] == expected == "a"


def test_vocabulary_limits_keep_the_most_frequent_categories() -> None:
    summary = SiteSummary(
        site="s", rows=10, continuous={}, categorical={"c": CategoricalSummary(counts={"x": 5, "y": 3, "z": 1, "w": 1}, missing=0)}
    )
    assert combine_summaries([summary], max_categories=2).vocabulary["c"] == ["x", "y"]
    assert combine_summaries([summary], min_category_count=2).vocabulary["c"] == ["x", "y"]
    assert combine_summaries([summary]).vocabulary["c"] == ["w", "x", "y", "z"]


def test_a_column_empty_at_every_site_is_refused() -> None:
    frame = pd.DataFrame({"lab": [np.nan, np.nan]})
    stats = combine_summaries([summarize_site("s", frame, ["lab"], [])])
    with pytest.raises(DataError, match="column 'lab' is empty in every site") as info:
        check_columns_observed(stats, "file.csv")
    assert "drop_columns" in str(info.value)


def test_random_oversampling_balances_training_rows_deterministically() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)).astype(np.float32)
    y = np.array([0] * 70 + [1] * 20 + [2] * 10)
    x1, y1 = oversample(x, y, "random", 5, "site")
    x2, y2 = oversample(x, y, "random", 5, "site")
    assert np.bincount(y1).tolist() == [70, 70, 70]
    np.testing.assert_array_equal(x1, x2)
    assert {tuple(r) for r in x1.tolist()} <= {tuple(r) for r in x.tolist()}  # duplicates only
    xs, ys = oversample(x, y, "smote", 5, "site")
    assert np.bincount(ys).tolist() == [70, 70, 70] and xs.dtype == np.float32
    with pytest.raises(DataError, match="SMOTE needs at least 2"):
        oversample(x, np.array([0] * 99 + [1]), "smote", 0, "site")


def _raw_sites(oversampling: str, seed: int = 0) -> list[RawSite]:
    rng = np.random.default_rng(seed)
    sites = []
    for index in range(2):
        frame = _site_frame(rng, 400, 0.0)
        frame["outcome"] = pd.array(rng.choice(np.array(["no", "yes", "late"], dtype=object), 400, p=[0.7, 0.2, 0.1]), dtype="str")
        sites.append(RawSite(f"s{index}", frame, f"s{index}.csv"))
    return sites


@pytest.mark.parametrize("method", ["random", "smote"])
def test_oversampling_touches_only_the_training_split(method: str) -> None:
    roles = ColumnRoles(target="outcome", continuous=tuple(CONTINUOUS), categorical=tuple(CATEGORICAL))
    plain = build_federated_data(_raw_sites("none"), roles, PreprocessOptions(), seed=1)
    over = build_federated_data(_raw_sites(method), roles, PreprocessOptions(oversample=method), seed=1)
    assert over.oversampled and not plain.oversampled
    for a, b in zip(plain.sites, over.sites, strict=True):
        np.testing.assert_array_equal(a.x_val, b.x_val)
        np.testing.assert_array_equal(a.x_test, b.x_test)
        counts = np.bincount(b.y_train)
        assert counts.min() == counts.max() == np.bincount(a.y_train).max()
    assert "→" in over.report_sections["Data: class balance"]


def test_pipeline_reports_imputation_and_releases_only_summaries() -> None:
    roles = ColumnRoles(target="outcome", continuous=tuple(CONTINUOUS), categorical=tuple(CATEGORICAL))
    data = build_federated_data(_raw_sites("none"), roles, PreprocessOptions(), seed=1)
    assert all(np.isfinite(s.x_train).all() and s.x_train.dtype == np.float32 for s in data.sites)
    imputed = data.report_sections["Data: values imputed"]
    assert "`creatinine`" in imputed and "`stay`" not in imputed  # stay has no missing value
    assert sorted(data.released_statistics) == ["preprocessing summary of s0", "preprocessing summary of s1"]
    for released in data.released_statistics.values():
        SiteSummary.model_validate(released)
