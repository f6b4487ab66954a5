"""The contract's rules, read once per site: :class:`StagePlan`.

Part of the site runtime (:mod:`fedcore.engine.site`); the sequential trainer
(:mod:`fedcore.engine.training`) and the vectorized one execute what it says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedcore.components import (
    BatchSampler,
    DPStep,
    GradientStep,
    LocalTrainingStage,
    RoundContext,
    SiteData,
    SiteInfo,
)
from fedcore.randomness import Secrets
from fedcore.spec import Components, TrainingSpec
from fedcore.types import ClientUpdate, PrivacySpent

#: seams that act inside the step loop (a stacked executor runs none of them itself)
PER_STEP_SEAMS = ("prepare", "sampler", "gradient_step", "transform_gradients")


def overrides(stage: LocalTrainingStage, method: str) -> bool:
    """Whether ``stage`` changes the contract's default ``method`` (unused seams cost nothing)."""
    return getattr(type(stage), method) is not getattr(LocalTrainingStage, method)


def _first(values: Any) -> Any:
    return next((v for v in values if v is not None), None)


@dataclass(frozen=True)
class StagePlan:
    """One site's stages read once by the contract's rules; fixed for the whole run.

    :ivar stages: every stage, in spec order (aggregator, privacy in list order, attacks).
    :ivar class_weight: the first stage's class weights for the loss, or None.
    :ivar dp: the record-level DP-SGD step a stage declares (:meth:`LocalTrainingStage.dp_step`).
    :ivar stacked_refusal: why a stacked executor cannot run this site (a per-step seam it
        does not implement), or None.
    """

    stages: tuple[LocalTrainingStage, ...]
    class_weight: np.ndarray | None
    dp: DPStep | None
    stacked_refusal: str | None

    @classmethod
    def of(cls, stages: Sequence[LocalTrainingStage], class_counts: np.ndarray | None) -> StagePlan:
        stages = tuple(stages)
        weight = None if class_counts is None else _first(s.class_weights(class_counts) for s in stages)
        declared = [(s, d) for s, d in ((s, s.dp_step()) for s in stages) if d is not None]
        refusal = None
        if len(declared) > 1:
            refusal = "more than one stage declares a DP-SGD step"
        dp_stage = declared[0][0] if declared else None
        for stage in stages:
            # A DP stage's sampler and gradient step are its sequential reference of the
            # declared step, which a stacked executor runs with its own kernels.
            allowed = ("sampler", "gradient_step") if stage is dp_stage else ()
            seam = next((m for m in PER_STEP_SEAMS if m not in allowed and overrides(stage, m)), None)
            if refusal is None and seam is not None:
                refusal = f"stage {type(stage).__name__} overrides {seam}(), which runs inside the step loop"
        return cls(stages, weight, declared[0][1] if declared else None, refusal)

    def using(self, method: str) -> list[LocalTrainingStage]:
        return [s for s in self.stages if overrides(s, method)]

    def training_data(self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's training data: every ``transform_training_data``, in order."""
        for stage in self.using("transform_training_data"):
            x, y = stage.transform_training_data(ctx, x, y)
        return x, y

    def sampler_and_step(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, batch_size: int, loss_fn: Callable[..., torch.Tensor]
    ) -> tuple[BatchSampler | None, GradientStep | None]:
        """The round's sampler and gradient step (first non-None of each; None: the defaults).

        Asked every round by every executor: a DP stage checks its budget here (raising
        :class:`fedcore.errors.PrivacyBudgetError` before the first step).
        """
        sampler: BatchSampler | None = None
        step: GradientStep | None = None
        for stage in self.stages:
            sampler = sampler or stage.sampler(ctx, x, y, batch_size)
            step = step or stage.gradient_step(ctx, loss_fn)
        return sampler, step

    def prepare(
        self, ctx: RoundContext, module: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        for stage in self.using("prepare"):
            module, optimizer = stage.prepare(ctx, module, optimizer)
        return module, optimizer

    def gradient_transforms(self) -> list[Callable[..., None]]:
        return [s.transform_gradients for s in self.using("transform_gradients")]

    def finish(self, ctx: RoundContext, module: torch.nn.Module, steps: int) -> None:
        for stage in self.using("finish"):
            stage.finish(ctx, module, steps)

    def release(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        """The update through every stage's ``transform_update``, in order."""
        for stage in self.stages:
            update = stage.transform_update(ctx, update)
        return update

    def privacy_spent(self) -> list[PrivacySpent]:
        return [r for r in (s.privacy_spent() for s in self.stages) if r is not None]


def site_info(
    site: SiteData,
    n_sites: int,
    n_features: int,
    n_classes: int,
    training: TrainingSpec,
    seed: int,
    max_rows_per_patient: int | None = None,
    secrets: Secrets | None = None,
) -> SiteInfo:
    """What components know about ``site`` when they create its stages.

    :param secrets: the training's secret randomness (DP noise keys, sampling); default: fresh
        OS randomness (:class:`fedcore.randomness.Secrets`).
    """
    return SiteInfo(
        site=site.site,
        n_sites=n_sites,
        n_train=site.n_train,
        n_features=n_features,
        n_classes=n_classes,
        class_counts=tuple(int(c) for c in site.class_counts(n_classes)),
        batch_size=training.batch_size,
        local_epochs=training.local_epochs,
        rounds=training.rounds,
        seed=seed,
        max_rows_per_patient=max_rows_per_patient,
        secrets=secrets if secrets is not None else Secrets(),
        local_steps=training.local_steps,
    )


def stages_for(components: Components, info: SiteInfo) -> list[LocalTrainingStage]:
    """The stages of one site, in spec order: aggregator, privacy (list order), attacks on this site.

    Creating them is where privacy mechanisms calibrate their noise, so an impossible
    budget fails here, before any training.
    """
    owners = [components.aggregator, *components.privacy]
    owners += [a for a in components.attacks if info.site in a.attacked_sites()]
    return [stage for stage in (owner.site_stage(info) for owner in owners) if stage is not None]
