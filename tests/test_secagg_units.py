"""Secure aggregation pieces that need no party processes: fixed point, frames, audit, plugin listing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedcore.errors import PluginError
from fedcore.plugins.privacy.secure import aggregator as crypten_plugin
from fedcore.plugins.privacy.secure.audit import individual_updates_received
from fedcore.plugins.privacy.secure.channel import ChannelError, decode_frames, encode_frame
from fedcore.plugins.privacy.secure.fixed_point import (
    VectorLayout,
    check_range,
    encode,
    error_bound,
    max_abs_value,
    reconstruct,
    sum_from_shares,
)
from fedcore.registry import PluginManager
from fedcore.spec import load_experiment
from fedcore.types import ClientUpdate, Weights

TEMPLATE = Weights(arrays={"w": np.zeros((4, 5), np.float32), "b": np.zeros(4, np.float32)})


def random_update(rng: np.random.Generator, site: int, n: int, scale: float = 1.0, extras: bool = False) -> ClientUpdate:
    def draw(a: np.ndarray) -> np.ndarray:
        return (rng.normal(size=a.shape) * scale).astype(np.float32)

    return ClientUpdate(
        site=site,
        round=1,
        delta=TEMPLATE.map(draw),
        n_samples=n,
        extras={"control": TEMPLATE.map(draw)} if extras else {},
    )


def additive_shares(values: np.ndarray, parties: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniform int64 shares of ``values`` (what the parties' zero sharings amount to)."""
    masks = [rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=values.shape, dtype=np.int64) for _ in range(parties - 1)]
    with np.errstate(over="ignore"):
        last = values - sum(masks, np.zeros_like(values))
    return [*masks, last]


def test_shares_of_fixed_point_vectors_sum_to_the_plain_sum_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    updates = [random_update(rng, site, n, scale, extras=True) for site, (n, scale) in enumerate([(40_000, 0.3), (7, 50.0), (1_234, 1e-4)])]
    layout = VectorLayout.of(TEMPLATE, updates[0].extras)
    per_site = [encode(layout.flatten(u), 16) for u in updates]
    shares_by_party = [additive_shares(v, 3, rng) for v in per_site]
    party_totals = [reconstruct([shares_by_party[s][p] for s in range(3)]) for p in range(3)]
    secure = sum_from_shares(1, layout, party_totals, 16)
    from fedcore.components import plain_sum

    plain = plain_sum(1, updates)
    bound = error_bound(16, 3)
    for name in TEMPLATE.names:
        assert np.max(np.abs(secure.weighted_delta_sum[name] - plain.weighted_delta_sum[name])) <= bound
        assert np.max(np.abs(secure.extras_sum["control"][name] - plain.extras_sum["control"][name])) <= bound
    assert (secure.total_samples, secure.n_sites) == (plain.total_samples, 3)
    # Any single party's total is uniformly random: far from every site's own encoded vector.
    for total in party_totals:
        for vector in per_site:
            assert not np.array_equal(total, vector)


def test_a_missing_site_contributes_zeros_and_is_not_counted() -> None:
    layout = VectorLayout.of(TEMPLATE)
    assert not layout.flatten(None).any()
    update = random_update(np.random.default_rng(1), 0, 10)
    summed = layout.unflatten(1, layout.flatten(update) + layout.flatten(None))
    assert (summed.total_samples, summed.n_sites) == (10, 1)


def test_a_layout_mismatch_is_refused() -> None:
    other = ClientUpdate(site=0, round=1, delta=Weights(arrays={"w": np.ones(3, np.float32)}), n_samples=1)
    with pytest.raises(ValueError, match="layout"):
        VectorLayout.of(TEMPLATE).flatten(other)


def test_values_that_could_wrap_the_ring_are_refused() -> None:
    limit = max_abs_value(16, 3)
    check_range(np.array([limit * 0.99, -limit * 0.99]), 16, 3)
    with pytest.raises(OverflowError, match="precision_bits=16"):
        check_range(np.array([0.0, limit * 1.01]), 16, 3)
    with pytest.raises(OverflowError, match="NaN"):
        check_range(np.array([np.nan]), 16, 3)


def test_frames_round_trip_and_reject_a_wrong_key() -> None:
    key = b"k" * 32
    data = encode_frame(key, {"type": "share", "round": 2}, b"\x01\x02") + encode_frame(key, {"type": "hello"})
    frames = decode_frames(data, key)
    assert frames == [({"round": 2, "type": "share"}, b"\x01\x02"), ({"type": "hello"}, b"")]
    with pytest.raises(ChannelError, match="authentication"):
        decode_frames(data, b"x" * 32)


def test_audit_finds_an_update_sent_in_the_clear_and_not_a_share_of_it() -> None:
    rng = np.random.default_rng(2)
    updates = [random_update(rng, site, 100) for site in range(3)]
    key = b"k" * 32
    in_clear = {0: b"".join(encode_frame(key, {"type": "update"}, u.delta.to_bytes()) for u in updates)}
    found = individual_updates_received(in_clear, updates, 16)
    assert {line.split("'s update")[0] for line in found} == {"round 1: site 0", "round 1: site 1", "round 1: site 2"}
    layout = VectorLayout.of(TEMPLATE)
    shares = additive_shares(encode(layout.flatten(updates[0]), 16), 3, rng)
    as_shares = {p: encode_frame(key, {"type": "share"}, s.astype("<i8").tobytes()) for p, s in enumerate(shares)}
    assert individual_updates_received(as_shares, updates, 16) == []


def test_plugin_is_listed_and_reports_why_it_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = PluginManager().components["secure_aggregator"]["crypten"]
    assert entry.cls is crypten_plugin.CrypTenSecureAggregator
    crypten_plugin.crypten_import_problem.cache_clear()
    monkeypatch.setitem(sys.modules, "crypten", None)  # what an absent package looks like to an import
    try:
        reason = entry.unavailable_reason
        assert reason is not None and "pip install --no-deps -r requirements/crypten.txt" in reason
        with pytest.raises(PluginError, match="unavailable"):
            load_experiment(None, (), text=SPEC_WITH_SECAGG)
        # Everything else still runs without CrypTen.
        load_experiment(None, (), text=SPEC_WITH_SECAGG.replace("secure_aggregation: {use: crypten}\n", ""))
    finally:
        crypten_plugin.crypten_import_problem.cache_clear()


SPEC_WITH_SECAGG = """\
name: secagg-units
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 100}}
secure_aggregation: {use: crypten}
"""


def test_aggregators_that_need_individual_updates_are_refused_naming_both_plugins() -> None:
    from fedcore.errors import SpecError

    plugins = PluginManager()
    individual = [n for n, e in plugins.components["aggregator"].items() if e.cls.needs_individual_updates]
    if not individual:
        pytest.skip("no aggregator that needs individual updates is installed")
    for name in individual:
        with pytest.raises(SpecError) as err:
            load_experiment(None, (), plugins, text=SPEC_WITH_SECAGG + f"aggregator: {{use: {name}}}\n")
        assert name in str(err.value) and "crypten" in str(err.value)


def test_the_secagg_paper_spec_is_the_paper_spec_with_secure_aggregation_on() -> None:
    import yaml

    specs = Path(__file__).resolve().parents[1] / "specs"
    paper = yaml.safe_load((specs / "paper.yaml").read_text())
    secagg = yaml.safe_load((specs / "paper-secagg.yaml").read_text())
    assert secagg.pop("secure_aggregation")["use"] == "crypten"
    assert secagg.pop("name") == "paper-secagg"
    paper.pop("name")
    assert secagg == paper
