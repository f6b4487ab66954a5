"""Audits of finished models: who sees what, the sites' releases, and the statistics over them.

An audit runs after training on the final global model of one (arm, repeat):

1. at the coordinator, :meth:`fedcore.components.Audit.prepare` (shadow models for
   LiRA are trained here, as federated runs of the same spec on each site's own
   shadow rows, by the engine the runner uses);
2. inside every site, :meth:`~fedcore.components.Audit.site_scores` scores the site's
   members (training rows) and non-members (its validation rows: held out, never the
   test split the metrics use), and :func:`site_release` reduces the scores to the
   site's :class:`~fedcore.components.SiteAttackStats` there: an AUC, TPRs at fixed
   FPR levels and counts at fixed levels. Scores never leave the site;
3. at the coordinator, :meth:`~fedcore.components.Audit.conclude` turns the releases
   into an :class:`~fedcore.components.AuditResult` (:func:`membership_result`,
   :func:`epsilon_lower_bound`).

Pooling over sites is what an attacker who sets one threshold per site (it knows
each record's hospital) achieves: at every FPR level, the member-weighted mean of
the sites' TPRs; its ROC area is the member-weighted mean of the sites' AUCs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score

from fedcore.components import (
    Audit,
    AuditResult,
    CountsAtLevels,
    EpsilonBound,
    FederatedData,
    MembershipMetrics,
    MembershipScores,
    SiteAttackStats,
    SiteData,
)
from fedcore.types import PrivacySpent, Weights

if TYPE_CHECKING:
    from fedcore.registry import PluginManager
    from fedcore.spec import ExperimentSpec

#: FPR levels at which sites release TPRs and counts (fixed in advance: never data-dependent)
FPR_LEVELS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999,
)  # fmt: skip
#: the levels reported as "TPR at FPR 1 %" and "TPR at FPR 0.1 %"
LEVEL_1PCT, LEVEL_01PCT = FPR_LEVELS.index(0.01), FPR_LEVELS.index(0.001)
#: sub-seeds of the audit's own (non-secret) randomness: target choice, halves, shadows
_TARGETS, _HALVES, _SHADOW_DATA, _SHADOW_RUN = 0xA0D1, 0xA0D2, 0x5AD0, 0x5AD1


def _derive(*parts: int) -> int:
    from fedcore.engine.simulation import derive_seed

    return derive_seed(*parts)


# ------------------------------------------------------------------ site side


@dataclass(frozen=True)
class AuditSite:
    """One site's rows as an audit sees them, used only inside that site.

    :ivar members: training rows the model was trained on (a random subset).
    :ivar nonmembers: held-out rows of the same site (its validation split).
    """

    site: int
    name: str
    x_members: np.ndarray
    y_members: np.ndarray
    x_nonmembers: np.ndarray
    y_nonmembers: np.ndarray
    module: torch.nn.Module

    @torch.no_grad()
    def logits(self, weights: Weights, x: np.ndarray, chunk: int = 65536) -> torch.Tensor:
        """The logits of the model with ``weights`` on rows ``x``."""
        from fedcore.engine.training import load_weights

        load_weights(self.module, weights)
        self.module.eval()
        xt = torch.from_numpy(np.ascontiguousarray(x))
        return torch.cat([self.module(xt[i : i + chunk]) for i in range(0, max(len(xt), 1), chunk)])

    def per_row(self, weights: Weights, statistic: str) -> tuple[np.ndarray, np.ndarray]:
        """A per-row statistic of the model on (members, non-members).

        ``log_prob``: log-probability of the true class (minus the cross-entropy loss);
        ``logit_confidence``: ``log p_y - log(1 - p_y)``, computed stably (LiRA's scaling).
        """
        out = []
        for x, y in ((self.x_members, self.y_members), (self.x_nonmembers, self.y_nonmembers)):
            logits = self.logits(weights, x).double()
            target = torch.from_numpy(y).long()
            true = logits.gather(1, target[:, None]).squeeze(1)
            if statistic == "log_prob":
                value = true - torch.logsumexp(logits, dim=1)
            elif statistic == "logit_confidence":
                others = logits.scatter(1, target[:, None], float("-inf"))
                value = true - torch.logsumexp(others, dim=1)
            else:
                raise ValueError(f"unknown statistic {statistic!r}")
            out.append(value.numpy())
        return out[0], out[1]


@dataclass(frozen=True)
class SiteTargets:
    """A site's audit split: members, non-members and the training rows left for shadow models."""

    members: np.ndarray
    nonmembers: np.ndarray
    shadow_pool: np.ndarray


def site_targets(site: SiteData, seed: int, max_targets: int) -> SiteTargets:
    """Row indices of a site's members (of its training split) and non-members (of its validation split).

    As many members as non-members, at most ``max_targets`` each and at most half the
    training rows, so the other half or more stays for shadow models.
    """
    rng = np.random.default_rng(_derive(seed, _TARGETS, site.site))
    n = min(len(site.y_val), max_targets, site.n_train // 2)
    order = rng.permutation(site.n_train)
    nonmembers = np.sort(rng.permutation(len(site.y_val))[:n])
    return SiteTargets(members=np.sort(order[:n]), nonmembers=nonmembers, shadow_pool=np.sort(order[n:]))


def _above(scores: np.ndarray, cut: float) -> int:
    return int(np.count_nonzero(scores > cut))


def _cut_at(nonmember_scores: np.ndarray, level: float) -> float:
    """The cut ``c`` of the attack "member iff score > c" with at most ``level`` of these non-members flagged."""
    ordered = np.sort(nonmember_scores)[::-1]
    allowed = int(math.floor(level * len(ordered) + 1e-9))
    return -math.inf if allowed >= len(ordered) else float(ordered[allowed])


def _counts(members: np.ndarray, nonmembers: np.ndarray, cuts: Sequence[float]) -> CountsAtLevels:
    return CountsAtLevels(
        n_members=len(members),
        n_nonmembers=len(nonmembers),
        true_positives=[_above(members, c) for c in cuts],
        false_positives=[_above(nonmembers, c) for c in cuts],
    )


def site_release(site: int, scores: MembershipScores, seed: int) -> SiteAttackStats:
    """Reduce one site's scores, inside the site, to what it releases (aggregates at fixed levels)."""
    members = np.asarray(scores.members, dtype=np.float64)
    nonmembers = np.asarray(scores.nonmembers, dtype=np.float64)
    if not len(members) or not len(nonmembers):
        raise ValueError(f"site {site} has no members or no non-members to audit")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    auc = float(roc_auc_score(labels, np.concatenate([members, nonmembers])))
    full_cuts = [_cut_at(nonmembers, f) for f in FPR_LEVELS]
    rng = np.random.default_rng(_derive(seed, _HALVES, site))
    m_sel = rng.permutation(len(members)) < len(members) // 2
    n_sel = rng.permutation(len(nonmembers)) < len(nonmembers) // 2
    cuts = [_cut_at(nonmembers[n_sel], f) for f in FPR_LEVELS]
    return SiteAttackStats(
        site=site,
        n_members=len(members),
        n_nonmembers=len(nonmembers),
        auc=auc,
        fpr_levels=list(FPR_LEVELS),
        tpr_at_fpr=[_above(members, c) / len(members) for c in full_cuts],
        selection=_counts(members[m_sel], nonmembers[n_sel], cuts),
        evaluation=_counts(members[~m_sel], nonmembers[~n_sel], cuts),
    )


# ----------------------------------------------------------- coordinator side


def _metrics(stats: SiteAttackStats, site: int | None) -> MembershipMetrics:
    return MembershipMetrics(
        site=site,
        n_members=stats.n_members,
        n_nonmembers=stats.n_nonmembers,
        auc=stats.auc,
        tpr_at_fpr_1pct=stats.tpr_at_fpr[LEVEL_1PCT],
        tpr_at_fpr_01pct=stats.tpr_at_fpr[LEVEL_01PCT],
    )


def _sum_counts(counts: Sequence[CountsAtLevels]) -> CountsAtLevels:
    return CountsAtLevels(
        n_members=sum(c.n_members for c in counts),
        n_nonmembers=sum(c.n_nonmembers for c in counts),
        true_positives=[int(v) for v in np.sum([c.true_positives for c in counts], axis=0)],
        false_positives=[int(v) for v in np.sum([c.false_positives for c in counts], axis=0)],
    )


def pool_releases(released: Sequence[SiteAttackStats]) -> SiteAttackStats:
    """The per-site-threshold attacker over all sites: member-weighted TPRs and AUC, summed counts."""
    weights = np.array([s.n_members for s in released], dtype=np.float64)
    weights /= weights.sum()
    return SiteAttackStats(
        site=-1,
        n_members=sum(s.n_members for s in released),
        n_nonmembers=sum(s.n_nonmembers for s in released),
        auc=float(np.dot(weights, [s.auc for s in released])),
        fpr_levels=list(released[0].fpr_levels),
        tpr_at_fpr=[float(v) for v in weights @ np.array([s.tpr_at_fpr for s in released])],
        selection=_sum_counts([s.selection for s in released]),
        evaluation=_sum_counts([s.evaluation for s in released]),
    )


def membership_result(audit: str, attack: str, released: Sequence[SiteAttackStats]) -> AuditResult:
    """Per-site and pooled AUC and TPR at low FPR of a membership attack."""
    return AuditResult(
        audit=audit,
        attack=attack,
        per_site=[_metrics(s, s.site) for s in released],
        pooled=_metrics(pool_releases(released), None),
        released=list(released),
    )


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def _log_ratio(numerator: float, denominator: float) -> float:
    if numerator <= 0:
        return 0.0
    if denominator <= 0:
        return math.inf
    return max(0.0, math.log(numerator / denominator))


def _bound_at(counts: CountsAtLevels, level: int, delta: float, confidence: float) -> tuple[float, str, tuple, tuple]:
    tpr = clopper_pearson(counts.true_positives[level], counts.n_members, confidence)
    fpr = clopper_pearson(counts.false_positives[level], counts.n_nonmembers, confidence)
    # TPR <= e^eps FPR + delta, and the same for the complementary test: TNR <= e^eps FNR + delta.
    forward = _log_ratio(tpr[0] - delta, fpr[1])
    backward = _log_ratio((1 - fpr[1]) - delta, 1 - tpr[0])
    return (forward, "tpr/fpr", tpr, fpr) if forward >= backward else (backward, "tnr/fnr", tpr, fpr)


def privacy_budget(privacy: Sequence[PrivacySpent]) -> tuple[float | None, float]:
    """The accounted (epsilon, delta) of a run: basic composition of its mechanisms; (None, 0) without DP."""
    if not privacy:
        return None, 0.0
    return sum(p.epsilon for p in privacy), min(1.0, sum(p.delta for p in privacy))


def epsilon_lower_bound(
    attack: str,
    released: Sequence[SiteAttackStats],
    privacy: Sequence[PrivacySpent],
    confidence: float = 0.95,
) -> EpsilonBound:
    """The empirical epsilon lower bound of the attack's best (TPR, FPR) pair (Jagielski 2020, Nasr 2021).

    The level is chosen on the selection halves (pooled over sites) and the bound is
    computed on the evaluation halves only, so choosing the best of many levels does not
    inflate it. Clopper-Pearson intervals at ``confidence`` for both rates.
    """
    pooled = pool_releases(released)
    accounted, delta = privacy_budget(privacy)
    levels = range(len(pooled.fpr_levels))
    best = max(levels, key=lambda i: (_bound_at(pooled.selection, i, delta, confidence)[0], -i))
    counts = pooled.evaluation
    epsilon, direction, tpr_ci, fpr_ci = _bound_at(counts, best, delta, confidence)
    return EpsilonBound(
        attack=attack,
        epsilon=epsilon,
        direction=direction,  # type: ignore[arg-type]
        fpr_level=pooled.fpr_levels[best],
        tpr=counts.true_positives[best] / max(counts.n_members, 1),
        fpr=counts.false_positives[best] / max(counts.n_nonmembers, 1),
        tpr_interval=tpr_ci,
        fpr_interval=fpr_ci,
        n_members=counts.n_members,
        n_nonmembers=counts.n_nonmembers,
        delta=delta,
        confidence=confidence,
        accounted_epsilon=accounted,
        exceeds_accounted=accounted is not None and epsilon > accounted,
    )


# -------------------------------------------------------------------- running


@dataclass
class AuditContext:
    """What an audit sees at the coordinator for one (arm, repeat).

    :ivar spec: the arm's resolved spec.
    :ivar final_weights: the final global model (the coordinator holds it).
    :ivar privacy: what the run's accountants computed (empty without DP).
    :ivar earlier: results of the audits listed before this one, by name.
    :ivar seed: the repeat's seed.
    :ivar plugins: the plugin manager that resolved the spec (shadow runs use its components).
    :ivar arm: the arm's label.

    The sites' data it carries in simulation is private to :meth:`train_shadows`, which
    stands for a federated run at the sites; an audit's own code never reads it.
    """

    spec: ExperimentSpec
    final_weights: Weights
    privacy: list[PrivacySpent]
    earlier: dict[str, AuditResult]
    seed: int
    plugins: PluginManager
    arm: str = "main"
    _data: FederatedData | None = field(default=None, repr=False)
    _targets: dict[int, SiteTargets] = field(default_factory=dict, repr=False)

    def train_shadows(self, count: int, fraction: float) -> list[Weights]:
        """Final weights of ``count`` shadow runs of this spec, trained by fedcore's engine.

        Each shadow run is a federated training like the audited one (same model,
        training, aggregator, privacy and attacks; no ledger, and no secure aggregation,
        which does not change the sum) in which every site trains on its own random
        ``fraction`` of its training rows, drawn from the rows that are not audit
        targets: shadows never see a member or a non-member. All shadows train together
        as one stacked computation when the vectorized engine runs the spec.
        """
        assert self._data is not None
        shadow_data = [self._shadow_data(k, fraction) for k in range(count)]
        seeds = [_derive(self.seed, _SHADOW_RUN, k) for k in range(count)]
        return train_federated(self.spec.model_copy(update=_SHADOW_SPEC_CHANGES), self.plugins, shadow_data, seeds)

    def _shadow_data(self, index: int, fraction: float) -> FederatedData:
        assert self._data is not None
        sites = []
        for site in self._data.sites:
            pool = self._targets[site.site].shadow_pool
            rng = np.random.default_rng(_derive(self.seed, _SHADOW_DATA, index, site.site))
            rows = np.sort(rng.choice(pool, size=max(2, min(len(pool), round(fraction * site.n_train))), replace=False))
            x, y = site.x_train[rows], site.y_train[rows]
            # Shadow runs are evaluated each round like any run: on a few of their own rows (cheap).
            sites.append(SiteData(site.site, site.name, x, y, x[:8], y[:8], x[:8], y[:8]))
        return FederatedData(
            sites=sites,
            feature_names=self._data.feature_names,
            class_names=self._data.class_names,
            max_rows_per_patient=self._data.max_rows_per_patient,
            oversampled=self._data.oversampled,
        )


_SHADOW_SPEC_CHANGES: dict[str, Any] = {"ledger": None, "secure_aggregation": None, "audits": []}


def train_federated(
    spec: ExperimentSpec, plugins: PluginManager, datasets: Sequence[FederatedData], seeds: Sequence[int]
) -> list[Weights]:
    """Final global weights of one federated run per (data, seed), through the engine the runner uses."""
    from fedcore.engine.runner import engine_for, train_runs
    from fedcore.engine.simulation import RunJob
    from fedcore.spec import build_components

    engine = engine_for(spec, build_components(spec, plugins), datasets[0])
    runs = [RunJob(build_components(spec, plugins), d, k, s) for k, (d, s) in enumerate(zip(datasets, seeds))]
    results = train_runs(spec, runs, "shadow", "federated", engine)
    return [r.final_weights for r in results if r.final_weights is not None]


def run_audits(
    spec: ExperimentSpec,
    plugins: PluginManager,
    data: FederatedData,
    final_weights: Weights,
    privacy: Sequence[PrivacySpent],
    seed: int,
    arm: str = "main",
) -> list[AuditResult]:
    """Every audit of ``spec.audits``, in order, on one (arm, repeat)'s final model."""
    from fedcore.spec import build_components, instantiate

    results: dict[str, AuditResult] = {}
    out: list[AuditResult] = []
    with torch.random.fork_rng(devices=[]):  # the weights are loaded later; leave the global RNG alone
        module = build_components(spec, plugins).model.build(data.n_features, data.n_classes)
    for ref in spec.audits:
        audit = instantiate(ref, "audit", plugins)
        assert isinstance(audit, Audit)
        started = time.perf_counter()
        max_targets = int(getattr(audit.settings, "max_targets", 5000))
        targets = {s.site: site_targets(s, seed, max_targets) for s in data.sites}
        context = AuditContext(spec, final_weights, list(privacy), dict(results), seed, plugins, arm, data, targets)
        prepared = audit.prepare(context)
        released: list[SiteAttackStats] = []
        for site in data.sites:
            # Inside the site: its rows, its scores; only the aggregate release leaves.
            chosen = targets[site.site]
            view = AuditSite(
                site.site,
                site.name,
                site.x_train[chosen.members],
                site.y_train[chosen.members],
                site.x_val[chosen.nonmembers],
                site.y_val[chosen.nonmembers],
                module,
            )
            scores = audit.site_scores(view, prepared)
            if scores is not None:
                released.append(site_release(site.site, scores, seed))
        result = audit.conclude(context, released)
        result = result.model_copy(update={"seconds": time.perf_counter() - started})
        results[result.audit] = result
        out.append(result)
    return out


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t confidence interval over repeats (nan with one value)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    if len(finite) == 1:
        return finite[0], math.nan
    from scipy.stats import t

    sd = float(np.std(finite, ddof=1))
    return float(np.mean(finite)), float(t.ppf(0.5 + confidence / 2, len(finite) - 1) * sd / math.sqrt(len(finite)))


__all__ = [
    "FPR_LEVELS",
    "AuditContext",
    "AuditSite",
    "clopper_pearson",
    "epsilon_lower_bound",
    "mean_ci",
    "membership_result",
    "pool_releases",
    "privacy_budget",
    "run_audits",
    "site_release",
    "site_targets",
    "train_federated",
]
