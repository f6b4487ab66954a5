"""``central-dp``: sites clip, the server adds Gaussian noise to the sum (DP-FedAvg).

Every site clips its update to the round's norm C before it leaves (so the mechanism
works when secure aggregation shows the server only the sum); the server adds
``N(0, z_update^2 C^2)`` to the sum of the clipped updates. Sites are weighted
equally, so one hospital changes the sum by at most C.

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive
clipping"): each site also sends the bit ``norm <= C`` as an extra tensor; the server
sees only the sum of bits, adds ``N(0, sigma_b^2)``, and moves C geometrically towards
the ``target_quantile`` of update norms: ``C <- C exp(-lr (unclipped_fraction - quantile))``.
The two Gaussian releases of a round together are one Gaussian mechanism of multiplier
``z = (z_update^-2 + sigma_b^-2)^-1/2``, which is what is accounted: the update sum has
L2 sensitivity C and noise ``z_update C``; the count of unclipped bits has sensitivity 1
(a hospital present or absent changes it by one: its bit is 0 or 1) and noise ``sigma_b``.
(Andrew et al.'s Theorem 1 has ``2 sigma_b`` for bits centred at 1/2, sensitivity 1/2; the
bits sent here are not centred, and accounting them at 1/2 under-stated epsilon.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator, LocalTrainingStage, PrivacyMechanism, RoundContext, SiteInfo
from fedcore.errors import PrivacyBudgetError, SpecError
from fedcore.noise import KEY_BYTES, add_noise
from fedcore.randomness import Secrets
from fedcore.plugins.privacy.accounting import Accountant, calibrate_noise_multiplier, prv_eps_error
from fedcore.plugins.privacy.gaussian import (
    BUDGET_SLACK,
    BudgetRefused,
    check_delta,
    clip_weights,
    mechanism_index,
    refuse_extras,
    refuse_several_mechanisms,
)
from fedcore.types import ClientUpdate, PrivacySpent, SecureSum, Weights

#: name of the clipped-or-not bit in ``ClientUpdate.extras`` (summed by any secure aggregator)
UNCLIPPED = "central-dp.unclipped"
#: name of the round's clipping norm in the broadcast extras, when the engine forwards them
CLIP_NORM = "central-dp.clip-norm"


class CentralDPSettings(BaseModel):
    """Settings of ``central-dp``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(1.0, gt=0, description="the whole run's budget; unit: one hospital")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clip_norm: float = Field(1.0, gt=0, description="fixed: C; adaptive: C of the first round")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: fraction of updates left unclipped")
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive: geometric step of C per round")
    count_noise_share: float = Field(
        0.1, gt=0, lt=1, description="adaptive: share of the per-round privacy (in z^-2) spent on the unclipped count"
    )
    max_noise_multiplier: float = Field(100.0, gt=0)


class ClipNorm:
    """The round's public clipping norm, set by the server and read by every site.

    In the simulation sites read this object; over a network it is the value the server
    broadcasts (``CLIP_NORM`` in the broadcast extras, preferred when present).
    """

    def __init__(self, value: float) -> None:
        self.value = value
        self.history: list[float] = [value]


class CentralClipStage(LocalTrainingStage):
    """A site's half of central DP: clip to the round's C, report the clipped-or-not bit."""

    def __init__(self, clip: ClipNorm, adaptive: bool) -> None:
        self.clip = clip
        self.adaptive = adaptive

    def transform_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        refuse_extras(update, "central DP")
        broadcast = ctx.broadcast_extras.get(CLIP_NORM)
        bound = float(broadcast["value"][0]) if broadcast is not None else self.clip.value
        clipped, norm = clip_weights(update.delta, bound)
        extras = dict(update.extras)
        if self.adaptive:
            extras[UNCLIPPED] = Weights(arrays={"count": np.array([1.0 if norm <= bound else 0.0])})
        return update.model_copy(update={"delta": clipped, "n_samples": 1, "extras": extras})


class CentralDP(PrivacyMechanism[CentralDPSettings]):
    """Server-side Gaussian noise on the sum of site-clipped updates, fixed or adaptive clipping."""

    name: ClassVar[str] = "central-dp"
    Settings: ClassVar[type[BaseModel]] = CentralDPSettings
    description: ClassVar[str] = "central DP: clip at sites, noise on the (secure) sum at the server; adaptive clipping"
    unit: ClassVar[str] = "site"

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        s = self.s
        self.clip = ClipNorm(s.clip_norm)
        self.accountant = Accountant(s.accountant, s.delta, prv_eps_error(s.epsilon))
        self.noise_multiplier: float | None = None
        self.rounds_planned: int | None = None
        self.rounds_done = 0
        self.secrets = Secrets()

    @property
    def s(self) -> CentralDPSettings:
        return self.settings

    # -- checks and calibration

    def check_spec(self, spec: Any, components: Any) -> None:
        refuse_several_mechanisms(spec)
        aggregator = type(components.aggregator)
        if aggregator.needs_individual_updates or aggregator.aggregate is not Aggregator.aggregate:
            raise SpecError(
                f"central-dp adds its noise to the sum of updates, but aggregator '{spec.aggregator.use}' "
                "looks at individual updates, which would skip the noise",
                where=f"privacy.{mechanism_index(spec, self)}.use",
                hint="choose an aggregator that needs only the sum (fedavg, fedavgm, fedprox, fedadam...)",
            )

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage:
        check_delta(self.name, self.s.delta, site.n_sites, "hospital", site.site)
        if self.noise_multiplier is None or self.rounds_planned != site.rounds:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.s.epsilon,
                delta=self.s.delta,
                sample_rate=1.0,
                steps=site.rounds,
                accountant=self.s.accountant,
                eps_error=self.accountant.eps_error,
                max_noise_multiplier=self.s.max_noise_multiplier,
                where=f"privacy[{self.name}].settings.epsilon",
            )
            self.rounds_planned = site.rounds
        # The server's noise keys: the training's secret source (fresh from the OS by default).
        self.secrets = site.secrets
        return CentralClipStage(self.clip, self.s.clipping == "adaptive")

    def noise_split(self, n_sites: int) -> tuple[float, float | None]:
        """(z for the update sum, sigma_b for the unclipped count), from the accounted z."""
        z = self._calibrated()
        if self.s.clipping == "fixed":
            return z, None
        share = self.s.count_noise_share
        # z^-2 = z_update^-2 + sigma_b^-2 (the count's sensitivity is 1), with sigma_b^-2 = share * z^-2.
        z_update = z / math.sqrt(1 - share)
        sigma_b = z / math.sqrt(share)
        return z_update, sigma_b

    def _calibrated(self) -> float:
        if self.noise_multiplier is None:
            raise PrivacyBudgetError(
                "central-dp was not calibrated: no site stage was created before aggregation",
                where="privacy",
                hint="this is an engine bug; please report it",
            )
        return self.noise_multiplier

    # -- the hard budget

    def refuse_round(self, round: int) -> str | None:
        """Why round ``round`` must not start (its noise would break the budget), or None."""
        z = self._calibrated()
        projected = self.accountant.epsilon(((z, 1.0, 1),))
        if projected > self.s.epsilon * (1 + BUDGET_SLACK):
            return (
                f"central-dp: round {round} would raise epsilon from {self.accountant.epsilon():.4g} "
                f"to {projected:.4g}, above the budget {self.s.epsilon:g}"
            )
        return None

    # -- server side

    def transform_sum(self, summed: SecureSum, generator: np.random.Generator) -> SecureSum:
        reason = self.refuse_round(summed.round)
        if reason is not None:
            raise BudgetRefused(reason, where="privacy", hint="the run stops here; raise epsilon or train fewer rounds")
        z_update, sigma_b = self.noise_split(summed.n_sites)
        bound = self.clip.value
        std = z_update * bound
        noisy = add_noise(summed.weighted_delta_sum.arrays, std, self.secrets.bytes(KEY_BYTES, "central-noise", summed.round))
        extras_sum = dict(summed.extras_sum)
        if sigma_b is not None:
            unclipped = extras_sum.pop(UNCLIPPED, None)
            count = float(unclipped["count"][0]) if unclipped is not None else 0.0
            count_key = self.secrets.bytes(KEY_BYTES, "central-count-noise", summed.round)
            noisy_count = add_noise({"count": np.array([count])}, sigma_b, count_key)["count"][0]
            noisy_fraction = float(noisy_count) / summed.n_sites
            self.clip.value = bound * math.exp(-self.s.clip_learning_rate * (noisy_fraction - self.s.target_quantile))
            self.clip.history.append(self.clip.value)
        self.accountant.step(self._calibrated(), 1.0, 1)
        self.rounds_done += 1
        return summed.model_copy(update={"weighted_delta_sum": Weights(arrays=noisy), "extras_sum": extras_sum})

    def broadcast_extras(self) -> dict[str, Weights]:
        """The round's clipping norm, for an engine that forwards a mechanism's broadcast."""
        return {CLIP_NORM: Weights(arrays={"value": np.array([self.clip.value])})}

    def privacy_spent(self, site_reports: Sequence[PrivacySpent]) -> PrivacySpent | None:
        if self.noise_multiplier is None:
            return None
        notes = [f"server noise on the sum of updates clipped at the sites ({self.s.clipping} clipping)"]
        if self.s.clipping == "adaptive":
            notes.append("clip norms by round: " + ", ".join(f"{c:.3g}" for c in self.clip.history))
        notes.append(
            "sites weighted equally: the update carries no sample count (its local step count and the per-site "
            "metrics still reveal split sizes); the server is trusted to add the noise and to keep the clipped "
            "updates (or only their sum, under secure aggregation) to itself"
        )
        return PrivacySpent(
            mechanism=self.name,
            unit="site",
            epsilon=self.accountant.epsilon(),
            delta=self.s.delta,
            accountant=self.s.accountant,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.clip.value,
            steps=self.accountant.steps,
            notes=notes,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "clip_norm": self.clip.value,
            "clip_history": list(self.clip.history),
            "rounds_done": self.rounds_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.clip.value = float(state["clip_norm"])
        self.clip.history = [float(c) for c in state["clip_history"]]
        self.rounds_done = int(state["rounds_done"])
