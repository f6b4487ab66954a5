"""Membership-inference attacks on the final model: the loss threshold (Yeom et al. 2018) and offline LiRA
(Carlini et al. 2022).

Both score each of a site's members and non-members inside the site; the core
reduces the scores there to aggregates (:func:`fedcore.audit.site_release`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.audit import AuditContext, AuditSite, membership_result
from fedcore.components import Audit, AuditResult, MembershipScores, SiteAttackStats
from fedcore.types import Weights


class _Targets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_targets: int = Field(
        5000, ge=10, description="members and non-members per site at most (each; non-members are validation rows)"
    )


class LossThresholdSettings(_Targets):
    """Settings of ``membership-loss``."""


class LossThresholdAttack(Audit):
    """Loss-threshold membership inference (Yeom et al. 2018): a low loss on a row says "trained on it".

    The attacker knows the final model, a row and its label, and picks a threshold
    on the loss; the ROC over all thresholds gives the AUC and the TPR at low FPR.
    """

    name: ClassVar[str] = "membership-loss"
    Settings: ClassVar[type[BaseModel]] = LossThresholdSettings
    description: ClassVar[str] = "loss-threshold membership inference (Yeom et al. 2018): AUC, TPR at FPR 1 % and 0.1 %"

    def prepare(self, context: AuditContext) -> Weights:
        return context.final_weights

    def site_scores(self, site: AuditSite, prepared: Weights) -> MembershipScores:
        members, nonmembers = site.per_row(prepared, "log_prob")
        return MembershipScores(members, nonmembers)

    def conclude(self, context: AuditContext, released: Sequence[SiteAttackStats]) -> AuditResult:
        return membership_result(self.name, "loss threshold (Yeom et al. 2018)", released)


class LiRASettings(_Targets):
    """Settings of ``membership-lira``."""

    shadows: int = Field(16, ge=2, le=256, description="shadow runs (all OUT: trained without any target row)")
    shadow_fraction: float = Field(
        0.0625,
        gt=0,
        le=0.5,
        description="share of a site's training rows each shadow run trains on (drawn from the non-target rows); "
        "smaller is cheaper, larger mimics the audited training more closely",
    )
    variance: Literal["global", "per-row"] = Field(
        "global", description="the OUT Gaussian's variance: one for all rows (robust with few shadows) or per row"
    )


class LikelihoodRatioAttack(Audit):
    """Offline LiRA (Carlini et al. 2022): a row's confidence compared with shadow models never trained on it.

    Shadow runs are federated trainings of the same spec by fedcore's engine on
    disjoint rows (every site its own); for each target row, the logit-scaled
    confidence in its label under the shadows fits a Gaussian, and the final
    model's confidence far above it says "member".
    """

    name: ClassVar[str] = "membership-lira"
    Settings: ClassVar[type[BaseModel]] = LiRASettings
    description: ClassVar[str] = "offline likelihood-ratio membership inference (Carlini et al. 2022) with shadow runs"

    def prepare(self, context: AuditContext) -> tuple[Weights, list[Weights]]:
        s: LiRASettings = self.settings  # type: ignore[assignment]
        return context.final_weights, context.train_shadows(s.shadows, s.shadow_fraction)

    def site_scores(self, site: AuditSite, prepared: tuple[Weights, list[Weights]]) -> MembershipScores:
        s: LiRASettings = self.settings  # type: ignore[assignment]
        target, shadows = prepared
        observed = site.per_row(target, "logit_confidence")
        out_runs = [site.per_row(w, "logit_confidence") for w in shadows]
        scores = []
        for part in (0, 1):
            phi = np.stack([run[part] for run in out_runs])  # (shadows, rows)
            mean = phi.mean(axis=0)
            if s.variance == "global":
                sd = np.full_like(mean, _global_sd(out_runs))
            else:
                sd = phi.std(axis=0, ddof=1)
            # One-sided test against the OUT Gaussian: the z-score orders rows as its p-value does.
            scores.append((observed[part] - mean) / np.maximum(sd, 1e-6))
        return MembershipScores(scores[0], scores[1])

    def conclude(self, context: AuditContext, released: Sequence[SiteAttackStats]) -> AuditResult:
        s: LiRASettings = self.settings  # type: ignore[assignment]
        result = membership_result(self.name, f"offline LiRA (Carlini et al. 2022), {s.shadows} shadow runs", released)
        return result.model_copy(
            update={
                "notes": [
                    f"{s.shadows} shadow runs, each training at every site on {100 * s.shadow_fraction:g} % of its "
                    "training rows (never a target row); they are releases of the sites' other rows outside the "
                    "audited run's accounted epsilon (each has its own, under the same mechanism)"
                ]
            }
        )


def _global_sd(out_runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """One standard deviation for every row: the spread of each row's OUT confidences, pooled."""
    centred = [
        np.stack([run[part] for run in out_runs]) - np.stack([run[part] for run in out_runs]).mean(axis=0)
        for part in (0, 1)
    ]
    values = np.concatenate([c.ravel() for c in centred])
    dof = max(values.size - sum(c.shape[1] for c in centred), 1)
    return float(np.sqrt(np.sum(values**2) / dof))
