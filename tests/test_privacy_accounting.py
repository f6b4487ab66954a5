"""Calibration and accounting of the privacy plugins, by Opacus's accountants."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from fedcore.errors import PrivacyBudgetError
from fedcore.plugins.privacy.accounting import (
    Accountant,
    calibrate_noise_multiplier,
    epsilon_of,
    group_privacy,
    prv_eps_error,
)

DELTA = 1e-5


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [0.1, 1.0, 5.0])
def test_calibrated_noise_reaches_target_within_one_percent(accountant: str, target: float) -> None:
    q, steps = 0.01, 2000
    eps_error = prv_eps_error(target)
    z = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=accountant, eps_error=eps_error
    )
    spent = epsilon_of(((z, q, steps),), DELTA, accountant, eps_error)
    assert target * 0.99 <= spent <= target
    # Less noise would overspend: the calibration is not simply conservative.
    assert epsilon_of(((z * 0.97, q, steps),), DELTA, accountant, eps_error) > target


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_paper_workload_reaches_epsilon_point_one_where_opacus_default_orders_cannot() -> None:
    q, steps = 32 / 40_000, 1250 * 5 * 10  # 40,000 training rows, batch 32, 5 epochs x 10 rounds
    z = calibrate_noise_multiplier(
        target_epsilon=0.1, delta=DELTA, sample_rate=q, steps=steps, accountant="rdp", eps_error=0.01
    )
    assert 0.099 <= epsilon_of(((z, q, steps),), DELTA, "rdp") <= 0.1
    default = RDPAccountant()
    default.history = [(z, q, steps)]
    assert default.get_epsilon(DELTA) > 0.1  # Opacus's orders stop at 63


def test_impossible_budget_is_refused() -> None:
    with pytest.raises(PrivacyBudgetError, match="out of reach") as info:
        calibrate_noise_multiplier(
            target_epsilon=1e-6, delta=DELTA, sample_rate=0.01, steps=1000, accountant="prv", eps_error=1e-3,
            where="privacy.0.settings.epsilon",
        )
    assert "privacy.0.settings.epsilon" in str(info.value)
    assert "\n" not in str(info.value)


def test_fixed_releases_are_part_of_the_budget() -> None:
    q, steps = 0.02, 150
    alone = calibrate_noise_multiplier(target_epsilon=1.0, delta=DELTA, sample_rate=q, steps=steps, accountant="rdp", eps_error=0.01)
    fixed = ((5.0, 1.0, 1),)
    with_counts = calibrate_noise_multiplier(
        target_epsilon=1.0, delta=DELTA, sample_rate=q, steps=steps, accountant="rdp", eps_error=0.01, fixed=fixed
    )
    assert with_counts > alone
    assert 0.99 <= epsilon_of((*fixed, (with_counts, q, steps)), DELTA, "rdp") <= 1.0


def test_accountant_counts_what_ran_and_survives_a_checkpoint() -> None:
    acc = Accountant("rdp", DELTA, 0.01)
    acc.step(1.0, 0.02, 50)
    acc.step(1.0, 0.02, 50)
    assert acc.history == [(1.0, 0.02, 100)]
    half = acc.epsilon()
    resumed = Accountant("rdp", DELTA, 0.01)
    resumed.load_state_dict(acc.state_dict())
    resumed.step(1.0, 0.02, 100)
    assert resumed.epsilon() > half
    assert resumed.epsilon() == pytest.approx(epsilon_of(((1.0, 0.02, 200),), DELTA, "rdp"))
    with pytest.raises(PrivacyBudgetError):
        Accountant("prv", DELTA, 0.01).load_state_dict(acc.state_dict())


def test_group_privacy_bound() -> None:
    eps, delta = group_privacy(0.5, 1e-6, 3)
    assert eps == 1.5
    assert delta == pytest.approx(3 * math.exp(1.0) * 1e-6)
    assert group_privacy(0.5, 1e-6, 1) == (0.5, 1e-6)
