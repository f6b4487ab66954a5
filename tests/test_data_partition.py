"""Partitioners (iid, Dirichlet label skew, by column) and patient-level splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from fedcore.errors import DataError
from fedcore.plugins.datasets.partition import PartitionSettings, assign_splits, partition


def _visits(n_patients: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 4, n_patients)
    patient = np.repeat(np.arange(n_patients), visits)
    label = np.repeat(rng.choice(["a", "b", "c"], n_patients, p=[0.5, 0.3, 0.2]), visits)
    source = rng.choice(["7", "1", "2", "4", "9"], len(patient))
    return pd.DataFrame({"pid": patient, "y": label, "source": source})


def test_iid_keeps_each_patient_at_one_site_and_balances_sizes() -> None:
    frame = _visits()
    sites = partition(frame, PartitionSettings(method="iid", sites=3), "y", "pid", seed=1, where="t")
    assert list(sites) == ["site-0", "site-1", "site-2"]
    assert sum(len(s) for s in sites.values()) == len(frame)
    owners = pd.concat([s.assign(site=name) for name, s in sites.items()]).groupby("pid")["site"].nunique()
    assert owners.max() == 1
    patients = [s["pid"].nunique() for s in sites.values()]
    assert max(patients) - min(patients) <= 1


def test_dirichlet_skews_labels_and_is_deterministic() -> None:
    frame = _visits(3000)
    settings = PartitionSettings(method="dirichlet", sites=4, alpha=0.1)
    first = partition(frame, settings, "y", "pid", seed=3, where="t")
    again = partition(frame, settings, "y", "pid", seed=3, where="t")
    for name in first:
        pd.testing.assert_frame_equal(first[name], again[name])
    shares = np.array([s["y"].value_counts(normalize=True).reindex(["a", "b", "c"], fill_value=0) for s in first.values()])
    assert np.ptp(shares, axis=0).max() > 0.3  # strongly different class mixes
    iid = partition(frame, PartitionSettings(method="iid", sites=4), "y", "pid", seed=3, where="t")
    iid_shares = np.array([s["y"].value_counts(normalize=True).reindex(["a", "b", "c"]) for s in iid.values()])
    assert np.ptp(iid_shares, axis=0).max() < 0.1


def test_dirichlet_that_cannot_fill_every_site_is_a_data_error() -> None:
    settings = PartitionSettings(method="dirichlet", sites=5, alpha=0.01, min_rows=300)
    with pytest.raises(DataError, match="raise data.settings.partition.alpha"):
        partition(_visits(200), settings, "y", "pid", seed=0, where="t.csv")


def test_column_partition_by_groups_with_a_rest_group() -> None:
    frame = _visits()
    settings = PartitionSettings(method="column", column="source", groups={"er": [7], "referral": [1, 2], "other": ["*"]})
    sites = partition(frame, settings, "y", "pid", seed=0, where="t")
    assert set(sites["er"]["source"]) == {"7"}
    assert set(sites["referral"]["source"]) == {"1", "2"}
    assert set(sites["other"]["source"]) == {"4", "9"}
    assert sum(len(s) for s in sites.values()) == len(frame)
    by_value = partition(frame, PartitionSettings(method="column", column="source"), "y", "pid", seed=0, where="t")
    assert list(by_value) == ["source=1", "source=2", "source=4", "source=7", "source=9"]


def test_column_partition_refuses_values_in_no_group() -> None:
    settings = PartitionSettings(method="column", column="source", groups={"er": ["7"]})
    with pytest.raises(DataError, match="in no group") as info:
        partition(_visits(), settings, "y", "pid", seed=0, where="t.csv")
    assert "'*'" in str(info.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "column"}, "needs 'column'"),
        ({"method": "iid", "column": "x"}, "apply only to method 'column'"),
        ({"method": "column", "column": "x", "groups": {"a": ["1"], "b": ["1"]}}, "value '1' is in groups"),
        ({"method": "column", "column": "x", "groups": {"a": ["*"], "b": ["*"]}}, "only one group"),
        ({"method": "kmeans"}, "Input should be"),
    ],
)
def test_partition_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PartitionSettings.model_validate(settings)


def test_patient_splits_agree_across_sites_without_coordination() -> None:
    frame = _visits(4000)
    # Two sites see overlapping patients; each computes its splits on its own.
    site_a, site_b = frame[frame["source"].isin(["7", "1"])], frame[~frame["source"].isin(["7", "1"])]
    splits = pd.concat(
        [
            pd.DataFrame({"pid": site_a["pid"], "split": assign_splits(site_a, "pid", (0.8, 0.1, 0.1), seed=5, site=0)}),
            pd.DataFrame({"pid": site_b["pid"], "split": assign_splits(site_b, "pid", (0.8, 0.1, 0.1), seed=5, site=1)}),
        ]
    )
    assert splits.groupby("pid")["split"].nunique().max() == 1
    shares = np.bincount(splits.drop_duplicates("pid")["split"], minlength=3) / frame["pid"].nunique()
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.03)
    other_seed = assign_splits(site_a, "pid", (0.8, 0.1, 0.1), seed=6, site=0)
    assert (other_seed != splits["split"].to_numpy()[: len(site_a)]).any()


def test_rows_without_patient_id_split_exactly() -> None:
    frame = pd.DataFrame({"x": range(50)})
    split = assign_splits(frame, None, (0.8, 0.1, 0.1), seed=0, site=0)
    assert np.bincount(split).tolist() == [40, 5, 5]
