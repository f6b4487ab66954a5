"""Site-level Gaussian noise, central DP (fixed and adaptive clipping), spec-load refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedcore.components import RoundContext, SiteInfo, plain_sum
from fedcore.errors import SpecError
from fedcore.plugins.privacy.accounting import epsilon_of
from fedcore.plugins.privacy.central_dp import UNCLIPPED, CentralDP, CentralDPSettings
from fedcore.plugins.privacy.gaussian import Gaussian, GaussianSettings
from fedcore.randomness import Secrets
from fedcore.spec import load_experiment
from fedcore.types import ClientUpdate, Weights

SPEC = """
name: dp-check
data: {use: DATA, settings: {sites: 3, patients_per_site: 200}}
training: {rounds: 2, local_epochs: 1, batch_size: 16}
aggregator: {use: AGG}
privacy: [PRIVACY]
"""


def spec_text(privacy: str, data: str = "synthetic-ehr", aggregator: str = "fedavg") -> str:
    return SPEC.replace("DATA", data).replace("AGG", aggregator).replace("PRIVACY", privacy)


def site_info(site: int = 0, rounds: int = 10, draw: int = 0) -> SiteInfo:
    # Reproducible secrets: the noise the statistical checks test is the same every run
    # (``draw`` picks another fixed draw).
    return SiteInfo(site, 3, 1000, 20, 3, (400, 400, 200), 32, 1, rounds, 0, secrets=Secrets(True, draw, "test"))


def update(delta: dict[str, np.ndarray], site: int = 0, round: int = 1) -> ClientUpdate:
    return ClientUpdate(site=site, round=round, delta=Weights(arrays=delta), n_samples=1000)


def ctx(round: int = 1, seed: int = 0) -> RoundContext:
    return RoundContext(0, round, Weights(arrays={}), torch.Generator().manual_seed(seed))


def test_site_level_released_update_has_the_calibrated_sigma() -> None:
    mechanism = Gaussian(GaussianSettings(level="site", epsilon=1.0, max_update_norm=0.5, accountant="prv"))
    stage = mechanism.site_stage(site_info())
    sigma = stage.noise_multiplier
    assert 0.99 <= epsilon_of(((sigma, 1.0, 10),), 1e-5, "prv", 0.01) <= 1.0
    raw = {"w": np.full((100, 100), 0.3, dtype=np.float32), "b": np.ones(100, dtype=np.float32)}
    released = stage.transform_update(ctx(), update(raw))
    assert stage.last_norm == pytest.approx(np.sqrt(100 * 100 * 0.09 + 100), rel=1e-5)
    clipped_w = 0.3 * 0.5 / stage.last_norm
    noise = np.concatenate([(released.delta["w"] - clipped_w).ravel(), (released.delta["b"] - 0.5 / stage.last_norm).ravel()])
    assert stats.kstest(noise / (sigma * 0.5), "norm").pvalue > 1e-3
    assert released.n_samples == 1
    assert raw["w"][0, 0] == np.float32(0.3)  # the input was not modified
    spent = stage.privacy_spent()
    assert spent.unit == "site" and spent.steps == 1 and spent.epsilon < 1.0


def test_central_dp_noises_only_the_sum_and_adapts_the_clip_norm() -> None:
    settings = CentralDPSettings(epsilon=2.0, accountant="rdp", clipping="adaptive", clip_norm=1.0)
    mechanism = CentralDP(settings)
    stages = [mechanism.site_stage(site_info(s)) for s in range(3)]
    big = {"w": np.full(400, 1.0, dtype=np.float32)}  # norm 20: every site is clipped
    released = [st.transform_update(ctx(), update(big, site=s)) for s, st in enumerate(stages)]
    assert all(r.delta.l2_norm() == pytest.approx(1.0, rel=1e-5) for r in released)
    assert all(float(r.extras[UNCLIPPED]["count"][0]) == 0.0 for r in released)
    summed = plain_sum(1, released)  # what a secure aggregator reveals: sums only
    noisy = mechanism.transform_sum(summed, np.random.default_rng(0))
    z_update, sigma_b = mechanism.noise_split(3)
    noise = noisy.weighted_delta_sum["w"] - summed.weighted_delta_sum["w"]
    assert stats.kstest(noise / (z_update * 1.0), "norm").pvalue > 1e-3
    # The count of unclipped bits has sensitivity 1: the two releases compose to the accounted z...
    assert (z_update ** -2 + sigma_b ** -2) ** -0.5 == pytest.approx(mechanism.noise_multiplier)
    # ...and the accountant's epsilon of the two Gaussian mechanisms, each at its true
    # sensitivity, is the epsilon reported (not more, as accounting the count at 1/2 gave).
    from fedcore.plugins.privacy.accounting import epsilon_of

    both = epsilon_of(((z_update, 1.0, 1), (sigma_b, 1.0, 1)), settings.delta, "rdp")
    assert both == pytest.approx(mechanism.privacy_spent([]).epsilon, rel=1e-6)
    spent = mechanism.privacy_spent([])
    assert spent is not None and spent.unit == "site" and spent.steps == 1


def test_central_dp_adapts_the_clip_norm_from_the_noised_unclipped_count() -> None:
    """Andrew et al.'s update C <- C exp(-lr (b - q)), b the noised fraction of unclipped sites:
    recovered over many server draws, b has the true fraction (0: every site clipped) as its
    mean and sigma_b / n_sites as its spread."""
    settings = CentralDPSettings(epsilon=2.0, accountant="rdp", clipping="adaptive", clip_norm=1.0)
    big = {"w": np.full(400, 1.0, dtype=np.float32)}  # norm 20: every site is clipped
    fractions = []
    for seed in range(200):
        mechanism = CentralDP(settings)
        stages = [mechanism.site_stage(site_info(s, draw=seed)) for s in range(3)]
        released = [st.transform_update(ctx(), update(big, site=s)) for s, st in enumerate(stages)]
        mechanism.transform_sum(plain_sum(1, released), np.random.default_rng(seed))
        fractions.append(settings.target_quantile - np.log(mechanism.clip.value) / settings.clip_learning_rate)
    _, sigma_b = mechanism.noise_split(3)
    spread = sigma_b / 3
    assert abs(np.mean(fractions)) < 4 * spread / np.sqrt(len(fractions))
    assert np.std(fractions) == pytest.approx(spread, rel=0.2)


def test_central_dp_refuses_aggregators_that_see_individual_updates() -> None:
    with pytest.raises(SpecError, match="individual updates") as info:
        load_experiment(text=spec_text("{use: central-dp}", aggregator="median"))
    assert "privacy.0.use" in str(info.value)
    load_experiment(text=spec_text("{use: central-dp}", aggregator="fedavg"))


def test_record_level_dp_refuses_oversampled_data() -> None:
    text = spec_text("{use: gaussian, settings: {level: record}}").replace("patients_per_site: 200", "patients_per_site: 200, oversample: smote")
    with pytest.raises(SpecError, match="oversampled") as info:
        load_experiment(text=text)
    message = str(info.value)
    assert "privacy.0.settings.level" in message and "class_weighted_loss" in message
    # Hospital-level DP does not count rows, so oversampling does not break it.
    load_experiment(text=text.replace("level: record", "level: site"))


def test_settings_are_strict() -> None:
    with pytest.raises(SpecError, match="unknown key 'epsilonn'"):
        load_experiment(text=spec_text("{use: gaussian, settings: {epsilonn: 1.0}}"))


def test_delta_must_be_below_one_over_the_protected_units() -> None:
    """The issue's run: delta = 0.999 with epsilon = 0.01 ran with noise multiplier 0.41."""
    from fedcore.plugins.privacy.gaussian import RecordLevelStage

    settings = GaussianSettings(level="record", epsilon=0.01, delta=0.999, accountant="rdp")
    with pytest.raises(SpecError, match=r"not below 1/n = 0\.001 \(n = 1000 training rows at site 0\)") as info:
        RecordLevelStage("gaussian", settings, site_info())
    assert "privacy[gaussian].settings.delta" in str(info.value)
    with pytest.raises(SpecError, match=r"1/n = 0\.333 \(n = 3 hospitals"):
        Gaussian(GaussianSettings(level="site", delta=0.5)).site_stage(site_info())
    with pytest.raises(SpecError, match="not below 1/n"):
        CentralDP(CentralDPSettings(delta=0.4)).site_stage(site_info())


def test_delta_refused_before_a_run_starts(tmp_path) -> None:
    from fedcore.engine.runner import preflight

    experiment = load_experiment(text=spec_text("{use: gaussian, settings: {level: record, delta: 0.999, epsilon: 0.01}}"))
    with pytest.raises(SpecError, match="not below 1/n"):
        preflight(experiment)


def test_several_mechanisms_in_one_privacy_list_are_refused() -> None:
    two = "{use: gaussian, settings: {level: site}}, {use: central-dp}"
    with pytest.raises(SpecError, match="2 privacy mechanisms in one run") as info:
        load_experiment(text=spec_text(two))
    assert "privacy.1" in str(info.value)
