"""``epsilon-lower-bound``: what an attack proves about epsilon, beside what the accountant computed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fedcore.audit import AuditContext, epsilon_lower_bound
from fedcore.components import Audit, AuditResult, SiteAttackStats
from fedcore.errors import SpecError
from fedcore.spec import Components, ExperimentSpec


class EpsilonLowerBoundSettings(BaseModel):
    """Settings of ``epsilon-lower-bound``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attack: str = Field("membership-loss", description="the membership audit, listed before this one, to bound from")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="of the Clopper-Pearson intervals of TPR and FPR")


class EpsilonLowerBound(Audit):
    """Empirical epsilon lower bound from an attack's best (TPR, FPR) pair (Jagielski et al. 2020; Nasr et al. 2021).

    Reads no data: only the attack's released counts. A (epsilon, delta)-DP training
    forces TPR <= e^epsilon FPR + delta for every attack, so ln((TPR_lo - delta) / FPR_hi)
    with Clopper-Pearson bounds is a lower bound on epsilon at the intervals' confidence.
    """

    name: ClassVar[str] = "epsilon-lower-bound"
    Settings: ClassVar[type[BaseModel]] = EpsilonLowerBoundSettings
    description: ClassVar[str] = "empirical epsilon lower bound (Clopper-Pearson 95 %) beside the accounted epsilon"

    def check_spec(self, spec: ExperimentSpec, components: Components) -> None:
        attack = self.settings.attack  # type: ignore[attr-defined]
        names = [ref.use for ref in spec.audits]
        mine = next((i for i, ref in enumerate(spec.audits) if ref.use == self.name), len(names))
        if attack not in names[:mine]:
            raise SpecError(
                f"epsilon-lower-bound bounds from audit '{attack}', which is not listed before it",
                where=f"audits.{mine}.settings.attack",
                hint=f"list {{use: {attack}}} before it in audits, or set attack to one of: "
                + (", ".join(names[:mine]) or "(no audit before it)"),
            )

    def conclude(self, context: AuditContext, released: Sequence[SiteAttackStats]) -> AuditResult:
        s: EpsilonLowerBoundSettings = self.settings  # type: ignore[assignment]
        attack = context.earlier[s.attack]
        bound = epsilon_lower_bound(s.attack, attack.released, context.privacy, s.confidence)
        return AuditResult(audit=self.name, attack=attack.attack, bound=bound)
