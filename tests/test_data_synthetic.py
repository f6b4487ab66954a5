"""synthetic-ehr: realistic, deterministic, heterogeneous, learnable but not trivially."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from fedcore.plugins.datasets.diabetes130 import Diabetes130
from fedcore.plugins.datasets.ehr_csv import EHRCSV
from fedcore.plugins.datasets.synthetic import SyntheticEHR, SyntheticEHRSettings
from fedcore.spec import load_experiment
from fedcore.testing import check_component


def _load(seed: int = 0, **settings: object):
    return SyntheticEHR(SyntheticEHRSettings(**{"sites": 3, "patients_per_site": 600, **settings})).load(seed)


@pytest.mark.parametrize("cls", [SyntheticEHR, EHRCSV, Diabetes130])
def test_components_follow_the_contract(cls: type) -> None:
    if cls is EHRCSV:  # `target` is required, so its defaults alone do not validate
        assert cls.Settings.model_config.get("extra") == "forbid" and cls.Settings.model_config.get("frozen")
        return
    check_component(cls)
    assert cls.Settings.model_config.get("frozen")


def test_same_seed_same_data_and_other_seed_other_data() -> None:
    a, b, c = _load(0), _load(0), _load(1)
    for x, y in zip(a.sites, b.sites, strict=True):
        np.testing.assert_array_equal(x.x_train, y.x_train)
        np.testing.assert_array_equal(x.y_test, y.y_test)
    assert not np.array_equal(a.sites[0].x_train, c.sites[0].x_train)
    assert a.report_sections == b.report_sections


def test_realistic_columns_missingness_and_types() -> None:
    data = _load()
    assert data.class_names == ["no readmission", "readmitted after 30 days", "readmitted within 30 days"]
    for name in ("age", "length_of_stay", "hba1c", "creatinine", "sodium", "prior_inpatient", "medications"):
        assert name in data.feature_names
    assert any(n.startswith("diagnosis_group_") for n in data.feature_names)
    assert any(n.startswith("race_") for n in data.feature_names)
    for site in data.sites:
        assert site.x_train.dtype == np.float32 and site.y_train.dtype == np.int64
        assert np.isfinite(site.x_train).all()
        assert set(np.unique(site.y_train)) == {0, 1, 2}
        assert (len(site.y_train), len(site.y_val), len(site.y_test)) == (480, 60, 60)
    imputed = data.report_sections["Data: values imputed"]
    assert "`hba1c`" in imputed and "`race`" in imputed and "`age`" not in imputed
    raw = SyntheticEHR(SyntheticEHRSettings(sites=1, patients_per_site=4000)).raw_sites(0)[0].frame
    assert 0.4 < raw["hba1c"].isna().mean() < 0.8  # HbA1c is rarely measured
    assert raw["creatinine"].isna().mean() < 0.15
    measured = raw.assign(m=raw["hba1c"].notna()).groupby("diagnosis_group")["m"].mean()
    assert measured["Diabetes"] > measured["Injury"] + 0.2  # missingness is informative, not random
    assert data.max_rows_per_patient is None and not data.oversampled


def test_heterogeneity_settings() -> None:
    sized = _load(site_sizes=[200, 1000, 400])
    assert [s.n_train + len(s.y_val) + len(s.y_test) for s in sized.sites] == [200, 1000, 400]

    def class_shares(data) -> np.ndarray:
        return np.array([np.bincount(s.y_train, minlength=3) / s.n_train for s in data.sites])

    skewed = class_shares(_load(patients_per_site=2000, label_skew=1.5))
    even = class_shares(_load(patients_per_site=2000, label_skew=0.0, covariate_shift=0.0))
    assert np.ptp(skewed, axis=0).max() > 0.15
    assert np.ptp(even, axis=0).max() < 0.06

    shifted = SyntheticEHR(SyntheticEHRSettings(sites=3, patients_per_site=2000, covariate_shift=2.0)).raw_sites(0)
    same = SyntheticEHR(SyntheticEHRSettings(sites=3, patients_per_site=2000, covariate_shift=0.0)).raw_sites(0)
    assert np.ptp([s.frame["age"].mean() for s in shifted]) > np.ptp([s.frame["age"].mean() for s in same]) + 2


def test_binary_outcome_and_oversampling_settings() -> None:
    data = _load(n_classes=2, oversample="random")
    assert data.class_names == ["no readmission", "readmitted"] and data.oversampled
    assert SyntheticEHR(SyntheticEHRSettings(oversample="random")).will_oversample()
    assert not SyntheticEHR(SyntheticEHRSettings()).will_oversample()
    with pytest.raises(ValidationError, match="site_sizes lists 2 sizes for 3 sites"):
        SyntheticEHRSettings(sites=3, site_sizes=[100, 100])


def test_paper_settings_stay_valid_from_yaml() -> None:
    text = "name: p\ndata: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 50000}}\n"
    experiment = load_experiment(None, text=text)
    assert experiment.spec.data.settings["patients_per_site"] == 50000
    legacy = "name: p\ndata: {use: synthetic-ehr, settings: {sites: 2, patients_per_site: 100, n_classes: 3, label_noise: 0.2}}\n"
    load_experiment(None, text=legacy)


def test_outcome_is_learnable_but_nonlinear() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    site = SyntheticEHR(SyntheticEHRSettings(sites=1, patients_per_site=8000)).load(0).sites[0]
    with threadpool_limits(1):  # the machine is shared; one thread is fast enough here
        linear = LogisticRegression(max_iter=500).fit(site.x_train, site.y_train).score(site.x_test, site.y_test)
        trees = HistGradientBoostingClassifier(max_iter=60, learning_rate=0.2, random_state=0)
        nonlinear = trees.fit(site.x_train, site.y_train).score(site.x_test, site.y_test)
    majority = np.bincount(site.y_test).max() / len(site.y_test)
    assert majority < 0.6
    assert 0.65 < linear < 0.8
    assert 0.78 < nonlinear < 0.92 and nonlinear > linear + 0.05
