"""The sequential executor: the one loop every site and the centralized baseline run.

The default path is what the fastest plain PyTorch loop does (batches sliced from
tensors reshuffled once per epoch, fused Adam, no per-step host syncs). Stages of
the local-training contract replace or extend single steps; unused seams cost
nothing per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedcore.components import BatchSampler, GradientStep, LocalTrainingStage, RoundContext
from fedcore.engine.stages import StagePlan
from fedcore.spec import TrainingSpec
from fedcore.types import Weights


def weights_of(module: torch.nn.Module) -> Weights:
    """The module's state (parameters and buffers) as boundary weights (a copy)."""
    return Weights(arrays={k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})


def load_weights(module: torch.nn.Module, weights: Weights) -> None:
    """Copy ``weights`` into ``module`` (the module is the caller's own, not a hook argument)."""
    state = module.state_dict()
    missing = set(state) ^ set(weights.names)
    if missing:
        raise ValueError(f"weights and module differ in tensors: {sorted(missing)}")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(torch.from_numpy(np.array(weights[name])))


def make_optimizer(params: Sequence[torch.nn.Parameter], training: TrainingSpec) -> torch.optim.Optimizer:
    """The spec's optimizer; Adam variants use the fused kernel (one call per step for all tensors)."""
    params = list(params)
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.learning_rate, weight_decay=training.weight_decay, fused=True)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=training.learning_rate, momentum=training.momentum, weight_decay=training.weight_decay)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> BatchSampler:
    """Default sampler: one permutation per epoch, then contiguous slices (views, no per-step gather)."""

    def epoch(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(y), generator=generator)
        xs, ys = x[perm], y[perm]
        for start in range(0, len(ys), batch_size):
            yield xs[start : start + batch_size], ys[start : start + batch_size]

    return epoch


@dataclass
class TrainingOutcome:
    steps: int
    mean_loss: float


class LocalTrainer:
    """The sequential executor: trains one module on one site's tensors as a :class:`StagePlan` says.

    :param module: the site's own module (reused across rounds).
    :param training: optimizer, learning rate, batch size, epochs.
    :param stages: the site's stages, in spec order (read into a plan here), or
    :param plan: the site's plan, already read (:class:`fedcore.engine.site.SiteRuntime` passes it).
    :param class_counts: training-set class counts (for class-weighted losses).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        training: TrainingSpec,
        stages: Sequence[LocalTrainingStage] = (),
        class_counts: np.ndarray | None = None,
        *,
        plan: StagePlan | None = None,
    ) -> None:
        self.module = module
        self.training = training
        self.use_plan(plan if plan is not None else StagePlan.of(stages, class_counts))
        self.optimizer: torch.optim.Optimizer | None = None

    def use_plan(self, plan: StagePlan) -> None:
        """Train by ``plan`` from now on (its class weights weigh the loss)."""
        self.plan = plan
        weight = plan.class_weight
        self._class_weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)

    @property
    def stages(self) -> tuple[LocalTrainingStage, ...]:
        return self.plan.stages

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self._class_weight, reduction=reduction)

    def run(
        self,
        ctx: RoundContext,
        x: torch.Tensor,
        y: torch.Tensor,
        epochs: int,
        keep_optimizer: bool = False,
    ) -> TrainingOutcome:
        """A whole local round by the plan: data seams, :meth:`train`, ``finish``."""
        x, y = self.plan.training_data(ctx, x, y)
        sampler, step = self.plan.sampler_and_step(ctx, x, y, self.training.batch_size, self.loss_fn)
        outcome = self.train(ctx, x, y, epochs, sampler, step, keep_optimizer)
        self.plan.finish(ctx, self.module, outcome.steps)
        return outcome

    def train(
        self,
        ctx: RoundContext,
        x: torch.Tensor,
        y: torch.Tensor,
        epochs: int,
        sampler: BatchSampler | None = None,
        step: GradientStep | None = None,
        keep_optimizer: bool = False,
        max_steps: int | None = None,
    ) -> TrainingOutcome:
        """Train for ``epochs`` epochs; a fresh optimizer each call unless ``keep_optimizer``.

        :param sampler: the round's batch sampler (default: reshuffled fixed-size batches).
        :param step: the round's gradient step (default: mean loss, ``backward``).
        :param max_steps: ``training.local_steps``: exactly this many steps instead, epoch
            after epoch of the sampler (stopping inside an epoch).
        """
        module = self.module
        if self.optimizer is None or not keep_optimizer:
            self.optimizer = make_optimizer(module.parameters(), self.training)
        module, optimizer = self.plan.prepare(ctx, module, self.optimizer)
        sampler = sampler or shuffled_batches(x, y, self.training.batch_size, ctx.generator)
        transforms = self.plan.gradient_transforms()
        params = [p for p in module.parameters() if p.requires_grad]
        module.train()
        steps = 0
        loss_sum = torch.zeros(())
        loss_fn = self.loss_fn
        for epoch in range(epochs) if max_steps is None else itertools.count():
            if max_steps is not None and steps >= max_steps:
                break
            before = steps
            for xb, yb in _first(sampler(epoch), None if max_steps is None else max_steps - steps):
                optimizer.zero_grad(set_to_none=True)
                if step is None:
                    loss = loss_fn(module(xb), yb)
                    loss.backward()
                else:
                    loss = step(module, xb, yb)
                for transform in transforms:
                    transform(ctx, params)
                optimizer.step()
                loss_sum += loss.detach()
                steps += 1
            if max_steps is not None and steps == before:
                break  # an epoch without a batch (an empty site): no step would ever come
        return TrainingOutcome(steps=steps, mean_loss=float(loss_sum) / max(steps, 1))


def _first(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches (all when ``n`` is None)."""
    return batches if n is None else itertools.islice(batches, n)
