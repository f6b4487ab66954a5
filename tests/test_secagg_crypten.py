"""The crypten secure aggregator with real party processes (CrypTen over gloo on loopback)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from fedcore.components import Aggregator, plain_sum
from fedcore.errors import SpecError
from fedcore.plugins.privacy.secure.aggregator import CrypTenSecureAggregator, CrypTenSettings, crypten_import_problem
from fedcore.plugins.privacy.secure.fixed_point import error_bound
from fedcore.plugins.privacy.secure.group import PartyFailure
from fedcore.types import ClientUpdate, Weights

pytestmark = [
    pytest.mark.skipif(crypten_import_problem() is not None, reason=f"{crypten_import_problem()}"),
    pytest.mark.slow,  # every test here starts real party processes (a few seconds each)
]

# The paper's MLP 128-64-32 on 20 features and 3 classes.
TEMPLATE = Weights(
    arrays={
        "0.weight": np.zeros((128, 20), np.float32),
        "0.bias": np.zeros(128, np.float32),
        "2.weight": np.zeros((64, 128), np.float32),
        "2.bias": np.zeros(64, np.float32),
        "4.weight": np.zeros((32, 64), np.float32),
        "4.bias": np.zeros(32, np.float32),
        "6.weight": np.zeros((3, 32), np.float32),
        "6.bias": np.zeros(3, np.float32),
    }
)


def updates_for(round: int, rng: np.random.Generator, sites: tuple[int, ...] = (0, 1, 2), extras: bool = False) -> list[ClientUpdate]:
    out = []
    for site in sites:
        scale = 10.0 ** rng.uniform(-4, 1)

        def draw(a: np.ndarray, scale: float = scale) -> np.ndarray:
            return (rng.normal(size=a.shape) * scale).astype(np.float32)

        out.append(
            ClientUpdate(
                site=site,
                round=round,
                delta=TEMPLATE.map(draw),
                n_samples=int(rng.integers(1, 60_000)),
                extras={"control": TEMPLATE.map(draw)} if extras else {},
            )
        )
    return out


def max_error(secure: Weights, plain: Weights) -> float:
    return max(float(np.max(np.abs(secure[k] - plain[k]))) for k in plain.names)


@pytest.fixture(scope="module")
def running() -> Iterator[CrypTenSecureAggregator]:
    aggregator = CrypTenSecureAggregator(CrypTenSettings(precision_bits=16))
    aggregator.open(3, TEMPLATE)
    yield aggregator
    aggregator.close()


def test_secure_sum_equals_plaintext_sum_within_the_fixed_point_bound(running: CrypTenSecureAggregator) -> None:
    rng = np.random.default_rng(11)
    bound = error_bound(16, 3)
    for round_ in (1, 2, 3):
        updates = updates_for(round_, rng, extras=round_ == 3)
        secure = running.secure_sum(round_, updates)
        plain = plain_sum(round_, updates)
        assert max_error(secure.weighted_delta_sum, plain.weighted_delta_sum) <= bound
        assert (secure.total_samples, secure.n_sites, secure.round) == (plain.total_samples, 3, round_)
        for name, extra in plain.extras_sum.items():
            assert max_error(secure.extras_sum[name], extra) <= bound
        assert secure.weighted_delta_sum.names == TEMPLATE.names


def test_a_site_without_an_update_is_left_out_of_the_sum(running: CrypTenSecureAggregator) -> None:
    rng = np.random.default_rng(12)
    updates = updates_for(4, rng, sites=(0, 2))
    secure = running.secure_sum(4, updates)
    plain = plain_sum(4, updates)
    assert secure.n_sites == 2 and secure.total_samples == plain.total_samples
    assert max_error(secure.weighted_delta_sum, plain.weighted_delta_sum) <= error_bound(16, 3)


def test_each_party_is_its_own_process(running: CrypTenSecureAggregator) -> None:
    pids = running.party_pids
    assert len(set(pids)) == 3 and os.getpid() not in pids
    for pid in pids:
        os.kill(pid, 0)  # alive


def test_an_update_too_large_for_the_fixed_point_range_fails_with_the_setting_to_change(
    running: CrypTenSecureAggregator,
) -> None:
    rng = np.random.default_rng(15)
    huge = updates_for(5, rng)
    huge[1] = huge[1].model_copy(update={"delta": TEMPLATE.map(lambda a: np.full(a.shape, 1e12, np.float32))})
    with pytest.raises(SpecError, match=r"party 1 \(site 1\) refused its update.*precision_bits=16") as err:
        running.secure_sum(5, huge)
    assert err.value.where == "secure_aggregation.settings.precision_bits"
    # Every party skipped that round together: the next one works.
    fine = updates_for(6, rng)
    assert max_error(running.secure_sum(6, fine).weighted_delta_sum, plain_sum(6, fine).weighted_delta_sum) <= error_bound(16, 3)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_party_that_dies_fails_the_round_quickly_with_a_clear_error() -> None:
    aggregator = CrypTenSecureAggregator(CrypTenSettings(round_timeout_s=30))
    aggregator.open(3, TEMPLATE)
    try:
        rng = np.random.default_rng(13)
        aggregator.secure_sum(1, updates_for(1, rng))
        victim = aggregator.party_pids[1]
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(PartyFailure, match=r"party 1 \(site 1\) died .*SIGKILL.*all parties were stopped"):
            aggregator.secure_sum(2, updates_for(2, rng))
        assert time.monotonic() - started < 10
        assert all(_gone(pid) for pid in aggregator.party_pids)
        with pytest.raises(PartyFailure, match="not running"):
            aggregator.secure_sum(3, updates_for(3, rng))
    finally:
        aggregator.close()


def test_a_party_that_hangs_fails_the_round_at_the_watchdog_timeout() -> None:
    aggregator = CrypTenSecureAggregator(CrypTenSettings(round_timeout_s=3))
    aggregator.open(3, TEMPLATE)
    try:
        frozen = aggregator.party_pids[2]
        os.kill(frozen, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(PartyFailure, match=r"no answer from party 2 \(site 2\) within the round 1 \(3 s\) timeout; parties 0, 1 were waiting"):
            aggregator.secure_sum(1, updates_for(1, np.random.default_rng(14)))
        assert 2.5 < time.monotonic() - started < 10
        assert all(_gone(pid) for pid in aggregator.party_pids)
    finally:
        aggregator.close()


class _IndividualOnly(Aggregator):
    """Looks at individual updates but forgot the capability flag (a third-party plugin mistake)."""

    name = "individual-only-test"

    def aggregate(self, round, global_weights, updates):  # type: ignore[no-untyped-def]
        return global_weights


def test_an_aggregator_without_a_sum_rule_is_refused_at_spec_load() -> None:
    from fedcore import hookimpl
    from fedcore.registry import PluginManager
    from fedcore.spec import load_experiment

    class Plugin:
        @hookimpl
        def fedcore_aggregators(self) -> list[type[Aggregator]]:
            return [_IndividualOnly]

    plugins = PluginManager(extra_plugins=[Plugin()])
    text = (
        "name: t\ndata: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 100}}\n"
        "aggregator: {use: individual-only-test}\nsecure_aggregation: {use: crypten}\n"
    )
    with pytest.raises(SpecError, match="individual-only-test.*crypten"):
        load_experiment(None, (), plugins, text=text)
