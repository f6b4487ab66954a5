"""``gaussian``: the study's Gaussian mechanism, accounted, at record or hospital level.

``level: record`` is DP-SGD at every site (Poisson batches, per-sample clipping to
``max_grad_norm``, Gaussian noise), its noise multiplier calibrated before the run
so that all rounds x local epochs x steps meet (epsilon, delta) for each site.
``level: site`` clips each site's whole update to ``max_update_norm`` and adds
``N(0, sigma^2 C^2)`` before it leaves the site, sigma calibrated over the rounds.

Both refuse a round the budget cannot pay for (projected before it starts) and step
their accountant by what actually ran, so a run stopped early reports what it spent.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import DP_SECRET_BYTES, LocalTrainingStage, PrivacyMechanism, RoundContext, SiteInfo
from fedcore.errors import PrivacyBudgetError, SpecError
from fedcore.noise import KEY_BYTES, add_noise
from fedcore.plugins.privacy.accounting import (
    Accountant,
    Composition,
    calibrate_noise_multiplier,
    group_privacy,
    prv_eps_error,
)
from fedcore.plugins.privacy.dpsgd import DPSGDParameters, dp_gradient_step, poisson_batches, poisson_schedule
from fedcore.types import ClientUpdate, PrivacySpent, Weights

#: relative slack when comparing a projected epsilon with the budget (accountant round-off)
BUDGET_SLACK = 1e-9


class GaussianSettings(BaseModel):
    """Settings of ``gaussian``; each applies to the level named in its description."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["record", "site"] = Field("record", description="the protected unit: a training row or a hospital")
    epsilon: float = Field(1.0, gt=0, description="the whole run's budget for each site")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus accountant (PRV is tighter, RDP faster)")
    max_grad_norm: float = Field(1.0, gt=0, description="record: per-sample gradient clipping norm C")
    max_update_norm: float = Field(1.0, gt=0, description="site: clipping norm C of a site's whole update")
    unit: Literal["record", "patient"] = Field(
        "record",
        description="record: the guarantee is per training row; patient: calibrated so that the group-privacy "
        "bound over the largest number of rows of one patient meets (epsilon, delta)",
    )
    class_weighted_loss: bool = Field(
        False, description="record: weight the loss by inverse class frequency from noisy, accounted class counts"
    )
    class_count_noise_multiplier: float = Field(
        50.0, gt=0, description="record: std of the Gaussian noise on each released class count"
    )
    max_noise_multiplier: float = Field(100.0, gt=0, description="a budget needing more noise is refused")


def mechanism_index(spec: Any, component: PrivacyMechanism) -> int:
    """This component's position in ``spec.privacy`` (for spec paths in error messages)."""
    dumped = component.settings.model_dump(mode="json")
    for index, ref in enumerate(spec.privacy):
        if ref.use == component.name and ref.settings == dumped:
            return index
    return 0


def refuse_several_mechanisms(spec: Any) -> None:
    """Refuse a spec with more than one ``privacy`` entry: no accountant composes them."""
    if len(spec.privacy) > 1:
        raise SpecError(
            f"{len(spec.privacy)} privacy mechanisms in one run ({', '.join(r.use for r in spec.privacy)}): "
            "each accounts only its own noise, so the run's epsilon would be wrong",
            where="privacy.1",
            hint="keep one entry in privacy; to compare mechanisms, sweep over privacy",
        )


def check_delta(mechanism: str, delta: float, count: int, unit: str, site: int) -> None:
    """Refuse ``delta >= 1/count``, ``count`` the protected units at a site: a larger delta
    allows releasing one unit's data outright with probability delta per unit."""
    bound = 1.0 / max(count, 1)
    if delta >= bound:
        raise SpecError(
            f"delta {delta:g} is not below 1/n = {bound:.3g} (n = {count} {unit}s at site {site})",
            where=f"privacy[{mechanism}].settings.delta",
            hint=f"set delta below {bound:.3g}, e.g. {10 ** math.floor(math.log10(bound) - 1):.0e}",
        )


class BudgetRefused(PrivacyBudgetError):
    """A round would spend more than the budget; raised before the round's first step."""


class _AccountedStage(LocalTrainingStage):
    """What every gaussian stage shares: an accountant, the budget, the report."""

    def __init__(
        self, mechanism: str, settings: GaussianSettings, info: SiteInfo, delta: float, eps_error: float
    ) -> None:
        self.mechanism = mechanism
        self.settings = settings
        self.info = info
        self.accountant = Accountant(settings.accountant, delta, eps_error)
        self.rounds_done = 0

    def round_plan(self) -> Composition:
        """The releases one more round makes (a projection for the budget check)."""
        raise NotImplementedError

    def refusal(self) -> str | None:
        """Why the next round would break the budget, or None."""
        projected = self.accountant.epsilon(self.round_plan())
        budget = self.budget_epsilon()
        if projected > budget * (1 + BUDGET_SLACK):
            return (
                f"site {self.info.site}: round {self.rounds_done + 1} would raise epsilon from "
                f"{self.accountant.epsilon():.4g} to {projected:.4g}, above the budget {budget:g}"
            )
        return None

    def budget_epsilon(self) -> float:
        return self.settings.epsilon

    def check_budget(self) -> None:
        reason = self.refusal()
        if reason is not None:
            raise BudgetRefused(reason, where="privacy", hint="the run stops here; raise epsilon or train fewer rounds")

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.rounds_done = int(state["rounds_done"])


class RecordLevelStage(_AccountedStage):
    """DP-SGD at one site: Poisson batches, per-sample clip and noise, the site's accountant.

    :ivar dp_parameters: the calibrated :class:`DPSGDParameters`, declared by :meth:`dp_step`.
    """

    def __init__(self, mechanism: str, settings: GaussianSettings, info: SiteInfo) -> None:
        # Rows, not patients: there are at least as many rows, so 1/rows is the stricter bound.
        check_delta(mechanism, settings.delta, info.n_train, "training row", info.site)
        self._group = info.max_rows_per_patient or 1
        if settings.unit == "patient":
            self._record_target, record_delta = self._record_budget(settings.epsilon, settings.delta)
        else:
            self._record_target, record_delta = settings.epsilon, settings.delta
        eps_error = prv_eps_error(self._record_target)
        super().__init__(mechanism, settings, info, record_delta, eps_error)
        self.notes: list[str] = []
        fixed: Composition = ()
        self._noisy_class_counts: np.ndarray | None = None
        if settings.class_weighted_loss:
            # Class counts steer every row's loss weight, so they are a release: noised
            # (L2 sensitivity 1 when a row is added or removed) and accounted.
            key = info.secrets.bytes(KEY_BYTES, "class-count-noise", info.site)
            counts = {"counts": np.asarray(info.class_counts, dtype=np.float64)}
            noisy = add_noise(counts, settings.class_count_noise_multiplier, key)["counts"]
            self._noisy_class_counts = np.maximum(noisy, 1.0)
            fixed = ((settings.class_count_noise_multiplier, 1.0, 1),)
            self.notes.append(
                f"class-weighted loss from class counts released with N(0, {settings.class_count_noise_multiplier:g}²) "
                "noise, accounted"
            )
        sample_rate, steps_per_epoch = poisson_schedule(info.n_train, info.batch_size)
        # training.local_steps: a round is that many Poisson batches (local_epochs is then 1)
        steps_per_epoch = info.local_steps or steps_per_epoch
        total_steps = steps_per_epoch * info.local_epochs * info.rounds
        where = f"privacy[{mechanism}].settings.epsilon"
        noise = calibrate_noise_multiplier(
            target_epsilon=self._record_target,
            delta=self.accountant.delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=settings.accountant,
            eps_error=eps_error,
            fixed=fixed,
            max_noise_multiplier=settings.max_noise_multiplier,
            where=where,
        )
        for entry in fixed:
            self.accountant.step(*entry)
        self.dp_parameters = DPSGDParameters(
            noise_multiplier=noise,
            max_grad_norm=settings.max_grad_norm,
            sample_rate=sample_rate,
            expected_batch_size=sample_rate * info.n_train,
            steps_per_epoch=steps_per_epoch,
            local_epochs=info.local_epochs,
            secret=info.secrets.bytes(DP_SECRET_BYTES, "dp-sgd", info.site),
        )
        self.notes += self._unit_notes()
        self.notes.append(
            "released outside the guarantee: the site's training-set size (update weight), training loss, "
            "per-site metrics and preprocessing statistics (listed below)"
        )

    def _record_budget(self, epsilon: float, delta: float) -> tuple[float, float]:
        """The per-row (epsilon, delta) whose group bound over a patient's rows is (epsilon, delta)."""
        k = self._group
        record_eps = epsilon / k
        return record_eps, delta / (k * math.exp((k - 1) * record_eps))

    def budget_epsilon(self) -> float:
        return self._record_target

    def _unit_notes(self) -> list[str]:
        k = self.info.max_rows_per_patient
        if k is None:
            return ["the data has no patient id: the protected unit is one training row"]
        if k == 1:
            return ["one training row per patient: protecting a row protects a patient"]
        if self.settings.unit == "patient":
            return [f"up to {k} rows per patient: per-row budget set so the group-privacy bound covers a patient"]
        return [f"up to {k} rows per patient: the guarantee is per row; see the patient-level group bound"]

    def state_dict(self) -> dict[str, Any]:
        # The noisy class counts were released once and accounted once: a stage rebuilt from
        # this state (a resumed run, a deployed node) must reuse them, never draw new ones.
        counts = None if self._noisy_class_counts is None else [float(c) for c in self._noisy_class_counts]
        return {**super().state_dict(), "noisy_class_counts": counts}  # plain floats: torch.load(weights_only=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("noisy_class_counts") is not None:
            self._noisy_class_counts = np.asarray(state["noisy_class_counts"], dtype=np.float64)

    def reported_unit(self) -> Literal["record", "patient"]:
        k = self.info.max_rows_per_patient
        if self.settings.unit == "patient" or k == 1:
            return "patient"
        return "record"

    # -- local training seams

    def dp_step(self) -> DPSGDParameters:
        return self.dp_parameters

    def class_weights(self, class_counts: np.ndarray) -> np.ndarray | None:
        if self._noisy_class_counts is None:
            return None
        counts = self._noisy_class_counts
        # scikit-learn's "balanced" weights, n / (n_classes * count), from the noisy counts.
        return (counts.sum() / (len(counts) * counts)).astype(np.float32)

    def sampler(self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Any:
        self.check_budget()
        params = self.dp_parameters
        return poisson_batches(x, y, params.sample_rate, params.steps_per_epoch, params.sampling_generator(ctx.round))

    def gradient_step(self, ctx: RoundContext, loss_fn: Any) -> Any:
        return dp_gradient_step(self.dp_parameters, loss_fn, self.dp_parameters.noise_key(ctx.round))

    def finish(self, ctx: RoundContext, module: torch.nn.Module, steps: int) -> None:
        self.accountant.step(self.dp_parameters.noise_multiplier, self.dp_parameters.sample_rate, steps)
        self.rounds_done += 1

    def round_plan(self) -> Composition:
        p = self.dp_parameters
        return ((p.noise_multiplier, p.sample_rate, p.steps_per_round),)

    def privacy_spent(self) -> PrivacySpent:
        epsilon, delta = self.accountant.epsilon(), self.accountant.delta
        notes = list(self.notes)
        k = self._group
        if k > 1:
            group_eps, group_delta = group_privacy(epsilon, delta, k)
            if self.settings.unit == "patient":
                notes.insert(0, f"per row: epsilon = {epsilon:.4g}, delta = {delta:.3g}")
                epsilon, delta = group_eps, group_delta
            else:
                notes.insert(0, f"per patient ({k} rows, group privacy): epsilon <= {group_eps:.4g}, delta <= {group_delta:.3g}")
        return PrivacySpent(
            mechanism=self.mechanism,
            unit=self.reported_unit(),
            epsilon=epsilon,
            delta=delta,
            accountant=self.settings.accountant,
            noise_multiplier=self.dp_parameters.noise_multiplier,
            max_grad_norm=self.dp_parameters.max_grad_norm,
            steps=self.accountant.steps,
            notes=notes,
        )


def refuse_extras(update: ClientUpdate, mechanism: str) -> None:
    """Refuse an update carrying tensors besides the model delta, which ``mechanism`` would release unprotected."""
    foreign = sorted(update.extras)
    if foreign:
        raise PrivacyBudgetError(
            f"the update carries extra tensors {foreign} that {mechanism} does not clip or noise",
            where="privacy",
            hint="use an aggregator that sends only the model update (fedavg, fedprox, fedadam...)",
        )


def clip_weights(weights: Weights, max_norm: float) -> tuple[Weights, float]:
    """``weights`` scaled to L2 norm at most ``max_norm`` (over all arrays), and the original norm."""
    norm = weights.l2_norm()
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return weights.map(lambda a: (a.astype(np.float64) * factor).astype(a.dtype)), norm


class SiteLevelStage(_AccountedStage):
    """Clips the site's update to C and adds N(0, sigma^2 C^2) before it leaves the site.

    Neighbouring data sets: the hospital's records present or absent (absent: it sends a
    zero update), so the clipped update has L2 sensitivity C and the accountant sees one
    Gaussian mechanism of noise multiplier sigma per round. Sites are weighted equally:
    the released update carries no sample count, which would be a release of its own.
    The noise key comes from ``SiteInfo.secrets``: fresh from the OS per site and round
    unless the run is in the reproducible mode.
    """

    def __init__(self, mechanism: str, settings: GaussianSettings, info: SiteInfo) -> None:
        check_delta(mechanism, settings.delta, info.n_sites, "hospital", info.site)
        eps_error = prv_eps_error(settings.epsilon)
        super().__init__(mechanism, settings, info, settings.delta, eps_error)
        self.noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=settings.epsilon,
            delta=settings.delta,
            sample_rate=1.0,
            steps=info.rounds,
            accountant=settings.accountant,
            eps_error=eps_error,
            max_noise_multiplier=settings.max_noise_multiplier,
            where=f"privacy[{mechanism}].settings.epsilon",
        )
        self.last_norm: float | None = None

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.settings.max_update_norm

    def round_plan(self) -> Composition:
        return ((self.noise_multiplier, 1.0, 1),)

    def transform_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        self.check_budget()
        refuse_extras(update, "site-level DP")
        clipped, self.last_norm = clip_weights(update.delta, self.settings.max_update_norm)
        key = self.info.secrets.bytes(KEY_BYTES, "site-noise", self.info.site, ctx.round)
        released = Weights(arrays=add_noise(clipped.arrays, self.noise_std, key))
        self.accountant.step(self.noise_multiplier, 1.0, 1)
        self.rounds_done += 1
        return update.model_copy(update={"delta": released, "n_samples": 1})

    def privacy_spent(self) -> PrivacySpent:
        return PrivacySpent(
            mechanism=self.mechanism,
            unit="site",
            epsilon=self.accountant.epsilon(),
            delta=self.accountant.delta,
            accountant=self.settings.accountant,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_update_norm,
            steps=self.accountant.steps,
            notes=[
                f"each update clipped to L2 norm {self.settings.max_update_norm:g} and noised at the site",
                "sites weighted equally: the update carries no sample count (its local step count and the "
                "per-site metrics still reveal split sizes; see what is released outside the guarantee)",
            ],
        )


class Gaussian(PrivacyMechanism[GaussianSettings]):
    """The Gaussian mechanism with an accountant: DP-SGD per record, or clip-and-noise per hospital."""

    name: ClassVar[str] = "gaussian"
    Settings: ClassVar[type[BaseModel]] = GaussianSettings
    description: ClassVar[str] = "Gaussian DP, accounted (PRV/RDP): DP-SGD per record or noisy updates per site"
    unit: ClassVar[str] = "record"

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self.stages: dict[int, _AccountedStage] = {}

    @property
    def s(self) -> GaussianSettings:
        return self.settings

    def check_spec(self, spec: Any, components: Any) -> None:
        refuse_several_mechanisms(spec)
        index = mechanism_index(spec, self)
        if self.s.level == "record" and components.dataset.will_oversample():
            raise SpecError(
                f"record-level DP cannot run on oversampled data ('{spec.data.use}' duplicates or synthesizes "
                "training rows, so one patient would count several times)",
                where=f"privacy.{index}.settings.level",
                hint=f"turn oversampling off in data.settings and set privacy.{index}.settings.class_weighted_loss: true",
            )

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage:
        stage: _AccountedStage
        if self.s.level == "record":
            stage = RecordLevelStage(self.name, self.s, site)
        else:
            stage = SiteLevelStage(self.name, self.s, site)
        self.stages[site.site] = stage
        return stage

    def refuse_round(self, round: int) -> str | None:
        """Why round ``round`` must not start (it would break some site's budget), or None."""
        reasons = [r for r in (stage.refusal() for stage in self.stages.values()) if r is not None]
        return "; ".join(reasons) or None
