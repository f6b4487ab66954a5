"""Audits: the plugin kind, the spec slot, the statistics, the site release, the red flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedcore.audit import (
    FPR_LEVELS,
    AuditContext,
    clopper_pearson,
    epsilon_lower_bound,
    membership_result,
    site_release,
    site_targets,
)
from fedcore.components import MembershipScores
from fedcore.errors import SpecError
from fedcore.registry import PluginManager
from fedcore.spec import load_experiment
from fedcore.testing import tiny_federated_data
from fedcore.types import PrivacySpent

from conftest import TINY_SPEC

AUDITS = ("membership-loss", "membership-lira", "epsilon-lower-bound")


def _spent(epsilon: float, delta: float = 1e-5) -> PrivacySpent:
    return PrivacySpent(mechanism="gaussian", unit="record", epsilon=epsilon, delta=delta, accountant="prv")


def _separated(n: int, gap: float, seed: int = 0) -> MembershipScores:
    rng = np.random.default_rng(seed)
    return MembershipScores(rng.normal(gap, 1, n), rng.normal(0, 1, n))


# ------------------------------------------------------------------ the kind


def test_audits_are_a_plugin_kind_listed_by_fedcore_plugins(run_cli) -> None:
    manager = PluginManager()
    assert set(AUDITS) <= set(manager.names("audit"))
    rows = json.loads(run_cli("plugins", "--json").stdout)
    listed = {(r["kind"], r["name"]) for r in rows}
    assert {("audit", name) for name in AUDITS} <= listed


def test_spec_audits_slot_resolves_typed_settings() -> None:
    text = TINY_SPEC + "audits: [{use: membership-loss}, {use: epsilon-lower-bound, settings: {confidence: 0.9}}]\n"
    spec = load_experiment(text=text).spec
    assert [a.use for a in spec.audits] == ["membership-loss", "epsilon-lower-bound"]
    assert spec.audits[0].settings == {"max_targets": 5000}
    assert spec.audits[1].settings == {"attack": "membership-loss", "confidence": 0.9}


@pytest.mark.parametrize(
    ("audits", "message"),
    [
        ("[{use: membership-los}]", "unknown audit 'membership-los'"),
        ("[{use: membership-lira, settings: {shadows: 1}}]", "audits.0.settings.shadows"),
        ("[{use: epsilon-lower-bound}, {use: membership-loss}]", "not listed before it"),
    ],
)
def test_bad_audits_are_one_line_user_errors(tmp_path: Path, run_cli, audits: str, message: str) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(TINY_SPEC + f"audits: {audits}\n")
    result = run_cli("validate", str(spec))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bound_needs_its_attack_before_it() -> None:
    with pytest.raises(SpecError, match="membership-lira"):
        load_experiment(text=TINY_SPEC + "audits: [{use: membership-loss}, {use: epsilon-lower-bound, settings: {attack: membership-lira}}]\n")


# ----------------------------------------------------------- the statistics


def test_clopper_pearson_matches_the_closed_forms() -> None:
    # 0 of n: upper end 1 - (alpha/2)^(1/n); n of n: lower end (alpha/2)^(1/n).
    low, high = clopper_pearson(0, 50, 0.95)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-9)
    low, high = clopper_pearson(50, 50, 0.95)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 50), rel=1e-9)
    from scipy.stats import binomtest

    for k, n in ((3, 10), (57, 250), (1, 5000)):
        exact = binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
        assert clopper_pearson(k, n, 0.9) == pytest.approx((exact.low, exact.high), rel=1e-6)


def test_site_release_is_aggregates_of_fixed_size() -> None:
    """What leaves a site does not grow with its rows and holds no per-row score."""
    small = site_release(0, _separated(100, 1.0), seed=1)
    large = site_release(0, _separated(3000, 1.0), seed=1)
    for stats in (small, large):
        dumped = stats.model_dump()
        assert len(dumped["tpr_at_fpr"]) == len(FPR_LEVELS)
        assert len(dumped["selection"]["true_positives"]) == len(FPR_LEVELS)
        assert len(dumped["evaluation"]["false_positives"]) == len(FPR_LEVELS)
    assert len(json.dumps(large.model_dump())) < 2 * len(json.dumps(small.model_dump()))
    assert small.selection.n_members + small.evaluation.n_members == 100


def test_release_measures_separation() -> None:
    perfect = site_release(0, MembershipScores(np.arange(100, 200.0), np.arange(0, 100.0)), seed=0)
    assert perfect.auc == 1.0 and all(t == 1.0 for t in perfect.tpr_at_fpr)
    chance = site_release(0, _separated(4000, 0.0), seed=0)
    assert abs(chance.auc - 0.5) < 0.03
    # At every level the attack flags at most that share of the non-members it was set on.
    for level, fp in zip(FPR_LEVELS, chance.selection.false_positives, strict=True):
        assert fp <= level * chance.selection.n_nonmembers + 1e-9


def test_pooled_is_the_member_weighted_per_site_attacker() -> None:
    a = site_release(0, _separated(300, 2.0, 1), seed=0)
    b = site_release(1, _separated(100, 0.0, 2), seed=0)
    result = membership_result("membership-loss", "loss", [a, b])
    assert result.pooled is not None and result.pooled.n_members == 400
    assert result.pooled.auc == pytest.approx(0.75 * a.auc + 0.25 * b.auc)
    assert result.pooled.tpr_at_fpr_1pct == pytest.approx(0.75 * a.tpr_at_fpr[3] + 0.25 * b.tpr_at_fpr[3])
    assert [m.site for m in result.per_site] == [0, 1]


def test_lower_bound_formula_on_known_counts() -> None:
    """max(ln((TPR_lo - delta) / FPR_hi), ln((TNR_lo - delta) / FNR_hi)), Clopper-Pearson ends, evaluation half."""
    release = site_release(0, MembershipScores(np.arange(1000, 2000.0), np.arange(0, 1000.0)), seed=0)
    bound = epsilon_lower_bound("membership-loss", [release], [_spent(50.0, 1e-5)])
    n_m, n_n = bound.n_members, bound.n_nonmembers
    assert (n_m, n_n) == (release.evaluation.n_members, release.evaluation.n_nonmembers)
    tpr_lo = clopper_pearson(round(bound.tpr * n_m), n_m, 0.95)[0]
    fpr_hi = clopper_pearson(round(bound.fpr * n_n), n_n, 0.95)[1]
    assert bound.tpr == 1.0 and bound.fpr <= 0.002
    expected = max(math.log((tpr_lo - 1e-5) / fpr_hi), math.log((1 - fpr_hi - 1e-5) / (1 - tpr_lo)))
    assert bound.epsilon == pytest.approx(expected)
    assert not bound.exceeds_accounted and bound.accounted_epsilon == 50.0


def test_bound_above_the_accounted_epsilon_is_flagged() -> None:
    """A separable attack against a (fake) accountant claiming epsilon = 0.1: the check fires."""
    release = site_release(0, _separated(2000, 4.0), seed=0)
    bound = epsilon_lower_bound("membership-loss", [release], [_spent(0.1)])
    assert bound.epsilon > 1 and bound.exceeds_accounted
    no_dp = epsilon_lower_bound("membership-loss", [release], [])
    assert no_dp.accounted_epsilon is None and not no_dp.exceeds_accounted and no_dp.delta == 0.0


def test_chance_attack_proves_nothing() -> None:
    release = site_release(0, _separated(3000, 0.0), seed=3)
    bound = epsilon_lower_bound("membership-loss", [release], [_spent(1.0)])
    assert bound.epsilon < 0.3 and not bound.exceeds_accounted


def test_report_flags_a_bound_above_the_accounted_epsilon_in_red() -> None:
    from fedcore.report.audits import FLAG, audits_section

    release = site_release(0, _separated(2000, 4.0), seed=0)
    loss = membership_result("membership-loss", "loss", [release])

    def summary(accounted: float) -> dict:
        bound = epsilon_lower_bound("membership-loss", [release], [_spent(accounted)])
        audits = [loss.model_dump(mode="json"), {**loss.model_dump(mode="json"), "audit": "epsilon-lower-bound",
                                                  "per_site": [], "pooled": None, "released": [],
                                                  "bound": bound.model_dump(mode="json")}]
        run = {"repeat": 0, "test": {"accuracy": 0.5}, "privacy": [_spent(accounted).model_dump()], "audits": audits}
        arm = {"label": "main", "federated": {"runs": [run], "aggregate": {"epsilon_max": accounted}}}
        return {"name": "t", "arms": [arm], "data": {"sites": [{"site": 0, "name": "site-0"}]}}

    flagged = audits_section(summary(0.1))
    assert FLAG in flagged and 'style="color:red"' in flagged and "🔴" in flagged
    assert FLAG not in audits_section(summary(100.0))


# ----------------------------------------------------------- targets, shadows


def test_targets_and_shadow_rows_are_disjoint_and_of_the_same_site() -> None:
    data = tiny_federated_data(sites=2, rows=400)
    site = data.sites[0]
    chosen = site_targets(site, seed=5, max_targets=1000)
    assert len(chosen.members) == len(chosen.nonmembers) == len(site.y_val)
    assert not set(chosen.members) & set(chosen.shadow_pool)
    assert len(chosen.members) + len(chosen.shadow_pool) == site.n_train
    context = AuditContext(
        load_experiment(text=TINY_SPEC).spec, None, [], {}, 5, PluginManager(), "main",  # type: ignore[arg-type]
        data, {s.site: site_targets(s, 5, 1000) for s in data.sites},
    )
    shadow = context._shadow_data(0, 0.25)
    member_rows = {row.tobytes() for row in site.x_train[chosen.members]}
    assert len(shadow.sites[0].y_train) == round(0.25 * site.n_train)
    assert not member_rows & {row.tobytes() for row in shadow.sites[0].x_train}
    assert not {row.tobytes() for row in site.x_val} & {row.tobytes() for row in shadow.sites[0].x_train}


@pytest.mark.parametrize("variance", ["global", "per-row"])
def test_lira_scores_rows_against_their_out_gaussians(variance: str) -> None:
    """A row the audited model is far more confident about than every shadow scores highest."""
    import torch

    from fedcore.audit import AuditSite
    from fedcore.engine.training import weights_of
    from fedcore.plugins.audits.membership import LikelihoodRatioAttack, LiRASettings

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 2, 1])  # only member 0 has label 0
    site = AuditSite(0, "site-0", x[:3], y[:3], x[3:], y[3:], module)
    shadows = []
    for seed in range(4):
        torch.manual_seed(seed + 1)
        shadows.append(weights_of(torch.nn.Linear(4, 3)))
    attack = LikelihoodRatioAttack(LiRASettings(shadows=4, variance=variance))
    scores = attack.site_scores(site, (shadows[0], shadows))
    assert scores.members.shape == (3,) and scores.nonmembers.shape == (3,)
    assert np.isfinite(scores.members).all() and np.isfinite(scores.nonmembers).all()
    # The audited model = a shadow: no row stands out much; scaled up on member 0's label: it does.
    with torch.no_grad():
        module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in shadows[0].arrays.items()})
        module.bias[0] += 50.0
    boosted = attack.site_scores(site, (weights_of(module), shadows))
    assert boosted.members[0] == max(np.concatenate([boosted.members, boosted.nonmembers]))


def test_every_field_a_site_releases_about_an_audit_is_declared() -> None:
    """A membership audit's per-site release is declared in fedcore.releases, field by field."""
    import numpy as np

    from fedcore.audit import site_release
    from fedcore.components import MembershipScores
    from fedcore.releases import undeclared

    rng = np.random.default_rng(0)
    stats = site_release(0, MembershipScores(rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 60)), seed=0)
    assert undeclared("SiteAttackStats", stats) == []
    assert undeclared("SiteAttackStats", {"new_field": 1}) == ["new_field"]
