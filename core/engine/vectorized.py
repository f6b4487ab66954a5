"""The vectorized engine: every site of a round (and every repeat) trained as one computation.

An executor of the site runtime's plans (:mod:`fedcore.engine.site`): the same
:class:`~fedcore.engine.site.SiteRuntime` objects (stages, generators, evaluation) as
:func:`fedcore.engine.simulation.run_federated`,
the same :class:`~fedcore.engine.simulation.Server`, the same ledger records and
:class:`~fedcore.types.RoundRecord` s. Only local training differs: the S model
copies of a round live as rows of one ``(S, P)`` tensor and take their optimizer
steps together (:mod:`fedcore.engine.vectorized_step`).

Equality with the sequential engine, without DP: every site draws
``torch.randperm`` from its own generator exactly when the sequential sampler
does, so each copy sees the same batches in the same order; the model starts from
``initial_module``; Adam is elementwise, so one optimizer over stacked rows is S
independent optimizers (a fresh one each round, as in :class:`LocalTrainer`).
Partial last batches are padded with zero-weight rows; a copy with fewer batches
simply skips the remaining steps of the epoch (its optimizer state untouched).

Record-level DP-SGD (the :class:`~fedcore.components.DPStep` a stage declares): Poisson
batches from :func:`fedcore.sampling.poisson_batches` and the round's sampling generator,
per-sample gradients by ``vmap(grad)``, Opacus's clipping, Gaussian noise
``N(0, (sigma * C)^2)`` from a :class:`fedcore.noise.GaussianNoise` stream under the
round's noise key, division by the expected batch size; the stage's own ``finish``
steps its accountant by the steps taken. The generator and the key derive from the
step's secret (OS randomness unless ``execution.reproducible_noise``) exactly as the
sequential trainer derives them, so in reproducible mode DP runs of the two engines
agree to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.optim.adam import adam as functional_adam

from fedcore.components import DPStep, FederatedData
from fedcore.engine.cpu import flush_denormals, gc_paused, huge_page_empty
from fedcore.engine.cuda_graphs import EpochBuffers, ReplayedStep
from fedcore.engine.native import AdamStep, NativeMLPStep, noise_library
from fedcore.engine.simulation import (
    FederatedRun,
    RunJob,
    RunResult,
    derive_seed,
    initial_module,
    pooled_site,
    record_epoch,
    scored_sites,
    site_stages,
)
from fedcore.engine.site import SiteRound
from fedcore.engine.stages import StagePlan
from fedcore.engine.training import load_weights, weights_of
from fedcore.engine.vectorized_step import Backend, ParamLayout, flat_grads, mlp_layers, shared_step
from fedcore.errors import PrivacyBudgetError
from fedcore.noise import DeviceGaussianNoise, GaussianNoise
from fedcore.sampling import poisson_batches
from fedcore.spec import Components, ExperimentSpec, TrainingSpec
from fedcore.types import GlobalModel, RoundRecord, Weights

RoundCallback = Callable[[RoundRecord], None]

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
#: DP batches are padded to a multiple of this, so few graph shapes are compiled (a plain
#: MLP's step compiles once for every width and takes its batches unpadded)
_DP_PAD = 4
#: ... and to a multiple of this in captured steps (a CUDA graph per width; padding is free on a GPU)
_GRAPH_DP_PAD = 16
#: at most this many copies per call of the compiled (non-private) step on a CPU: a step's
#: activations then stay in cache (~15 % fewer CPU seconds a step for 1,000 copies than one
#: call for all) and its memory, and that of compiling it, no longer grows with the copies
COPIES_PER_CALL = 128
#: at most this many steps per call of the native step with Adam inside (each copy's steps of
#: a call one after another, its state in the core's cache): a call stays short (Ctrl-C is
#: seen between calls) and the Python around it runs once for all of them
_STEPS_PER_CALL = 256
#: where the native step cannot draw DP-SGD's noise itself (a build without OpenSSL), the
#: noise is drawn a block of steps ahead, at most this many bytes a block (about four steps
#: of the paper's 15 copies): more steps a block keep a copy's state in cache longer, a larger
#: block leaves the shared cache sooner
_NOISE_BLOCK_BYTES = 4 << 20


# ------------------------------------------------------------------- capability


def _module_reason(module: torch.nn.Module) -> str | None:
    if any(True for _ in module.buffers()):
        return "the model has buffers (e.g. batch norm statistics) that change during training"
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.p > 0:
            return "the model uses dropout, whose random masks cannot match the sequential engine's"
    if not any(p.requires_grad for p in module.parameters()):
        return "the model has no trainable parameters"
    return None


def refusal(spec: ExperimentSpec, components: Components, data: FederatedData, plans: Sequence[StagePlan]) -> str | None:
    """Why the stacked executor cannot run this run's sites (``plans``, one per site), or None."""
    if spec.secure_aggregation is not None:
        # The server side is shared code, but party processes per round are what costs:
        # nothing to gain, so leave it to the sequential engine.
        return f"secure aggregation '{spec.secure_aggregation.use}' runs its own protocol"
    reason = _module_reason(components.model.build(data.n_features, data.n_classes))
    if reason:
        return reason
    for site, plan in zip(data.sites, plans, strict=True):
        if plan.stacked_refusal:
            return f"site {site.site}: {plan.stacked_refusal}"
    if len({plan.dp is None for plan in plans}) > 1:
        return "DP-SGD runs at some sites and not at others"
    return None


def unsupported_reason(spec: ExperimentSpec, components: Components, data: FederatedData) -> str | None:
    """Why the vectorized engine cannot run this spec exactly, or None when it can.

    Creates every site's stages (calibrating DP noise, as any run does) and reads them
    with :class:`~fedcore.engine.stages.StagePlan`; trains nothing.
    """
    plans = [
        StagePlan.of(site_stages(spec, components, data, site, spec.seed), site.class_counts(data.n_classes))
        for site in data.sites
    ]
    return refusal(spec, components, data, plans)


# ---------------------------------------------------------------- stacked copies


@dataclass
class CopyTask:
    """One model copy's local training for this call: its data, generator, loss weights.

    :ivar generator: shuffles non-private batches (the site's seeded generator).
    :ivar dp: the copy's DP-SGD step; its Poisson batches and noise key derive from the
        step's secret and ``round`` (:meth:`DPStep.sampling_generator`, :meth:`DPStep.noise_key`).
    """

    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    class_weight: torch.Tensor | None = None
    dp: DPStep | None = None
    round: int = 0


@dataclass
class CopyOutcome:
    steps: int
    mean_loss: float


class StackedTrainer:
    """S copies of one module trained together; row ``i`` of :attr:`flat` is copy ``i``.

    :param module: the model plugin's module (its parameters are not used, only its code).
    :param training: optimizer, learning rate, batch size.
    :param n_copies: S.
    :param dtype: float32, or float64 for exactness tests.
    :param device: ``cpu`` or ``cuda``.
    :param backend: how steps are compiled (:class:`~fedcore.engine.vectorized_step.CompiledStep`).
    :param copies_per_call: on a CPU, the non-private step runs on row blocks of about this
        many copies (equal blocks, so at most two step shapes are compiled); each copy's
        numbers are the same in any block. One block on other devices.
    :param cuda_graphs: on a CUDA device, run each epoch whose copies all step together as
        replays of one captured step (:mod:`fedcore.engine.cuda_graphs`; same numbers).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        training: TrainingSpec,
        n_copies: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        backend: Backend = "auto",
        copies_per_call: int = COPIES_PER_CALL,
        cuda_graphs: bool = True,
    ) -> None:
        self.training = training
        self.device = torch.device(device)
        #: epochs as replays of one step (captured on CUDA; tests set it on a CPU, where the step runs eagerly)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        #: captured steps and their buffers, by what they are specialised on
        self._graphs: dict[tuple[object, ...], EpochBuffers] = {}
        #: the copies' noise generators on an accelerator, kept (and reseeded) across calls
        self._device_noise: DeviceGaussianNoise | None = None
        #: the noise streams of the epoch a captured DP step is replaying
        self._epoch_noise: GaussianNoise | DeviceGaussianNoise | None = None
        self.dtype = dtype
        self.module = module.to(device=self.device, dtype=dtype)
        self.layout = ParamLayout.of(self.module)
        self.n_copies = n_copies
        self.flat = torch.zeros(n_copies, self.layout.size, dtype=dtype, device=self.device)
        self.views = self.layout.views(self.flat)
        blocks = -(-n_copies // copies_per_call) if self.device.type == "cpu" else 1
        size = -(-n_copies // max(blocks, 1))
        #: row blocks ``(start, stop)`` of the copies, each with its parameter views
        self.blocks = [(a, min(a + size, n_copies)) for a in range(0, n_copies, max(size, 1))]
        self._block_views = [self.layout.views(self.flat[a:b]) for a, b in self.blocks]
        #: the step's gradients as (S, P) rows, one buffer reused by every step
        self._grad: torch.Tensor | None = None
        #: the last stacked rows of each kind, with the tensors they came from (:meth:`_stacked`)
        self._stacks: dict[str, tuple[tuple[torch.Tensor, ...], tuple[int, ...], torch.Tensor]] = {}
        self.step = shared_step("train", self.module, self.layout, backend)
        self.dp_step = shared_step("dp", self.module, self.layout, backend)
        #: a plain MLP's step in C++ on the CPU (:mod:`fedcore.engine.native`), where it builds; ``backend="auto"`` only
        self.native = NativeMLPStep.of(self.module, self.layout, dtype, self.device) if backend == "auto" else None
        self._dp_pad = 1 if mlp_layers(self.module, self.layout) is not None else _DP_PAD
        self._adam_kwargs: dict[str, Any] = dict(
            lr=training.learning_rate, beta1=_ADAM_BETAS[0], beta2=_ADAM_BETAS[1], weight_decay=training.weight_decay,
            eps=_ADAM_EPS, amsgrad=False, maximize=False,
        )  # fmt: skip
        kernel_name = "_fused_adamw_" if training.optimizer == "adamw" else "_fused_adam_"
        self._adam_kernel = getattr(torch, kernel_name, None) if self.device.type == "cpu" else None
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.reset_optimizer()

    # -- weights

    def set_copy(self, index: int, weights: Weights, count: int = 1) -> None:
        """Copies ``index .. index + count - 1`` start from ``weights``."""
        row = np.concatenate([np.asarray(weights[n]).ravel() for n in self.layout.names])
        self.flat[index : index + count].copy_(torch.from_numpy(row).expand(count, -1))

    def copy_weights(self, index: int, template: Weights) -> Weights:
        """Copy ``index`` as weights laid out and typed like ``template``."""
        row = self.flat[index].detach().cpu().numpy()
        arrays = {}
        for name, offset, numel, shape in zip(
            self.layout.names, self.layout.offsets, self.layout.numels, self.layout.shapes, strict=True
        ):
            arrays[name] = row[offset : offset + numel].reshape(shape).astype(template[name].dtype)
        return Weights(arrays=arrays)

    # -- optimizer

    def reset_optimizer(self) -> None:
        """Fresh optimizer state for every copy (the sequential engine makes one per round)."""
        # Zeroed in place: two new (S, P) buffers beside the old ones would raise the peak memory.
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.momentum: torch.Tensor | None = None
        self.counts = np.zeros(self.n_copies, dtype=np.int64)
        #: every copy has taken the same number of steps (kept by :meth:`_count`)
        self._counts_equal = True
        if not hasattr(self, "_step"):
            # One tensor for the trainer's life: a captured step reads and advances it.
            self._step = torch.zeros((), dtype=torch.float32, device=self.device)
        self._step.zero_()

    def _optimizer_step(self, grad: torch.Tensor, active: np.ndarray, every: bool = False) -> None:
        """One optimizer step of the rows in ``active`` (S,) with ``grad`` (S, P).

        :param every: ``active`` is known to be all true (saves checking it every step).
        """
        t = self.training
        if t.optimizer == "sgd":
            self._sgd_step(grad, active)
            return
        uniform = self._counts_equal and (every or bool(active.all()))
        self._count(active, every)
        if uniform:
            # One fused kernel over all rows: bit-identical to S fused per-model Adams.
            self._fused_adam(grad, int(self.counts[0]))
            return
        self._masked_adam(grad, active)

    def _native_adam(self) -> AdamStep | None:
        """Adam's steps for the native step to take copy by copy, right after each gradient,
        each copy from its own step count; None where the optimizer is not Adam. The caller
        counts the steps taken (:meth:`_count`)."""
        if self.training.optimizer != "adam":
            return None
        k = self._adam_kwargs
        settings = (k["lr"], k["beta1"], k["beta2"], k["weight_decay"], k["eps"])
        return AdamStep(self.exp_avg, self.exp_avg_sq, settings, torch.from_numpy(self.counts.copy()))

    def _count(self, active: np.ndarray, every: bool = False) -> None:
        """One more step for the rows in ``active`` (S,) -- or, with counts instead of a mask,
        that many more steps for each row."""
        if every:
            self.counts += 1
            return
        self.counts += active
        self._counts_equal = bool((self.counts == self.counts[0]).all())

    def _in_step(self, active: np.ndarray) -> bool:
        """Every copy steps (``active``) from the same step count: one fused Adam serves all rows."""
        return self._counts_equal and bool(active.all())

    def _fused_adam(self, grad: torch.Tensor, step: int) -> None:
        self._step.fill_(float(step))
        kwargs = self._adam_kwargs
        kernel = self._adam_kernel
        if kernel is not None:
            # The aten kernel torch.optim.Adam(fused=True) calls, without ~100 us of
            # per-call Python around it (this runs once per step).
            kernel([self.flat], [grad], [self.exp_avg], [self.exp_avg_sq], [], [self._step], **kwargs)
            return
        self._step.sub_(1)  # the functional form counts the step itself
        self._advance_adam(grad)

    def _advance_adam(self, grad: torch.Tensor) -> None:
        """Fused Adam on every row; it adds one to the step count on the device itself (as a captured step needs)."""
        functional_adam(
            [self.flat], [grad], [self.exp_avg], [self.exp_avg_sq], [], [self._step], fused=True,
            decoupled_weight_decay=self.training.optimizer == "adamw", **self._adam_kwargs,
        )  # fmt: skip

    def _masked_adam(self, grad: torch.Tensor, active: np.ndarray) -> None:
        """torch.optim.Adam's update with a per-row step count; inactive rows stay bit-identical.

        Written operation for operation as ``torch.optim.adam._single_tensor_adam`` (bias
        corrections as Python floats, the same operand order), so rows round the same.
        """
        t = self.training
        beta1, beta2 = _ADAM_BETAS
        on = torch.as_tensor(active, dtype=self.dtype, device=self.device).unsqueeze(1)
        steps = np.maximum(self.counts, 1).tolist()
        step_size = [t.learning_rate / (1 - beta1**c) for c in steps]
        bias2_sqrt = [(1 - beta2**c) ** 0.5 for c in steps]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=self.dtype, device=self.device).unsqueeze(1)

        if t.weight_decay and t.optimizer == "adam":
            grad = grad + t.weight_decay * self.flat
        if t.weight_decay and t.optimizer == "adamw":
            self.flat.mul_(1 - t.learning_rate * t.weight_decay * on)
        self.exp_avg.lerp_(grad, (1 - beta1) * on)
        self.exp_avg_sq.mul_(column([beta2 if a else 1.0 for a in active])).addcmul_(grad * ((1 - beta2) * on), grad)
        denom = (self.exp_avg_sq.sqrt() / column(bias2_sqrt)).add_(_ADAM_EPS)
        self.flat.addcdiv_(self.exp_avg * (column(step_size) * on), denom, value=-1.0)

    def _sgd_step(self, grad: torch.Tensor, active: np.ndarray) -> None:
        """torch.optim.SGD's update (no dampening, no Nesterov), skipping inactive rows."""
        t = self.training
        on = torch.as_tensor(active, dtype=self.dtype, device=self.device).unsqueeze(1)
        if t.weight_decay:
            grad = grad + t.weight_decay * self.flat
        if t.momentum:
            if self.momentum is None:
                self.momentum = torch.zeros_like(self.flat)
            first = torch.as_tensor(self.counts == 0, device=self.device).unsqueeze(1)
            # The first step of a row starts its buffer at the gradient, as torch.optim.SGD does.
            updated = torch.where(first, grad, self.momentum * t.momentum + grad)
            self.momentum = torch.where(on > 0, updated, self.momentum)
            grad = self.momentum
        self._count(active)
        self.flat.sub_(grad * (on * t.learning_rate))

    # -- training

    def train(self, tasks: Sequence[CopyTask], epochs: int) -> list[CopyOutcome]:
        """Train every copy on its task for ``epochs`` epochs (copy i = ``tasks[i]``)."""
        if len(tasks) != self.n_copies:
            raise ValueError(f"{len(tasks)} tasks for {self.n_copies} copies")
        dp = [task.dp for task in tasks]
        if any(d is not None for d in dp) and not all(d is not None for d in dp):
            raise ValueError("DP-SGD must apply to every copy trained together or to none")
        x_all = self._stacked("x", [task.x for task in tasks], self.dtype)
        y_all = self._stacked("y", [task.y for task in tasks], tasks[0].y.dtype)
        sizes = np.array([len(task.y) for task in tasks], dtype=np.int64)
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), device=self.device)
        row_weight = self._row_weights(tasks, y_all)
        loss_sum = torch.zeros(self.n_copies, dtype=torch.float64, device=self.device)
        steps = np.zeros(self.n_copies, dtype=np.int64)
        # A DP copy's noise stream and sampling generator are its round's, from its step's
        # secret (the sequential trainer derives the same two).
        noise, sampling = None, []
        if dp[0] is not None:
            noise = self._noise_streams([t.dp.noise_key(t.round) for t in tasks])  # type: ignore[union-attr]
            sampling = [t.dp.sampling_generator(t.round) for t in tasks]  # type: ignore[union-attr]
        # Flushing denormals, the garbage collector paused: see fedcore.engine.cpu.
        with flush_denormals(), gc_paused():
            for _ in range(epochs):
                if dp[0] is None:
                    plan = self._shuffled_plan(tasks, sizes)
                else:
                    plan = self._poisson_plan(sampling, sizes, dp)  # type: ignore[arg-type]
                index, weight_mask, active = plan
                gidx = index + offsets.view(-1, 1, 1)
                if dp[0] is None:
                    # index_select on a flat index gathers several times faster than advanced indexing.
                    # Features are gathered per step and block (a copy of the epoch's rows is as
                    # big as the data); labels and weights, small, for the epoch.
                    flat = gidx.reshape(-1)
                    y_epoch = y_all.index_select(0, flat).view(gidx.shape)
                    w_epoch = row_weight.index_select(0, flat).view(gidx.shape) * weight_mask
                    w_epoch = w_epoch / w_epoch.sum(dim=2, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny)
                    self._run_epoch(x_all, gidx, y_epoch, w_epoch, active, loss_sum)
                else:
                    # DP weights are the class weights themselves (Opacus sums per-sample losses).
                    self._run_dp_epoch(
                        tasks, noise, x_all, y_all, gidx, row_weight[gidx] * weight_mask, weight_mask.sum(dim=2), active, loss_sum  # type: ignore[arg-type]
                    )
                steps += active.sum(axis=1)
        mean = (loss_sum.cpu().numpy() / np.maximum(steps, 1)).tolist()
        return [CopyOutcome(int(s), float(m)) for s, m in zip(steps, mean, strict=True)]

    def _stacked(self, name: str, parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The copies' rows one after another, on the device; on the CPU in huge pages (a
        step gathers rows at random from them). Kept for the next call (``name``: which
        stack) and given again while the same tensors, unchanged, come in: a federated
        run's sites train on the same rows every round (stacking the paper's 15 copies,
        91 MB into fresh pages, took ~0.15 s a round)."""
        kept = self._stacks.get(name)
        if (
            kept is not None
            and kept[2].dtype == dtype
            and len(kept[0]) == len(parts)
            and all(a is b and a._version == v for a, b, v in zip(kept[0], parts, kept[1], strict=True))
        ):
            return kept[2]
        self._stacks.pop(name, None)  # the old stack's memory first
        if self.device.type != "cpu":
            stacked = torch.cat(list(parts)).to(device=self.device, dtype=dtype)
        else:
            stacked = torch.cat(list(parts), out=huge_page_empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype))
        # The parts themselves are kept: none of them can be freed and another take its place.
        self._stacks[name] = (tuple(parts), tuple(p._version for p in parts), stacked)
        return stacked

    def _row_weights(self, tasks: Sequence[CopyTask], y_all: torch.Tensor) -> torch.Tensor:
        parts = []
        for task in tasks:
            if task.class_weight is None:
                parts.append(torch.ones(len(task.y), dtype=self.dtype, device=self.device))
            else:
                parts.append(task.class_weight.to(device=self.device, dtype=self.dtype)[task.y.to(self.device)])
        return torch.cat(parts)

    def _shuffled_plan(self, tasks: Sequence[CopyTask], sizes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The sequential sampler's batches: one ``randperm`` per copy per epoch, contiguous slices."""
        batch = self.training.batch_size
        n_steps = -(-sizes // batch)
        most = int(n_steps.max())
        index = torch.zeros(self.n_copies, most * batch, dtype=torch.long)
        mask = torch.zeros(self.n_copies, most * batch, dtype=self.dtype)
        for i, task in enumerate(tasks):
            n = int(sizes[i])
            index[i, :n] = torch.randperm(n, generator=task.generator)
            mask[i, :n] = 1
        active = np.arange(most)[None, :] < n_steps[:, None]
        return (
            index.view(self.n_copies, most, batch).to(self.device),
            mask.view(self.n_copies, most, batch).to(self.device),
            active,
        )

    def _poisson_plan(
        self, sampling: Sequence[torch.Generator], sizes: np.ndarray, dp: Sequence[DPStep]
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Poisson-subsampled batches for every step of one epoch, from each copy's round generator."""
        n_steps = np.array([d.steps_per_epoch for d in dp])
        most = int(n_steps.max())
        draws = [
            poisson_batches(int(sizes[i]), dp[i].sample_rate, int(n_steps[i]), generator)
            for i, generator in enumerate(sampling)
        ]
        widest = max(1, max(int(d.shape[1]) for d in draws))
        width = -(-widest // self._dp_pad) * self._dp_pad
        index = torch.zeros(self.n_copies, most, width, dtype=torch.long)
        mask = torch.zeros(self.n_copies, most, width, dtype=self.dtype)
        for i, d in enumerate(draws):
            k = d.shape[1]
            index[i, : d.shape[0], :k] = d.clamp_min(0)
            mask[i, : d.shape[0], :k] = (d >= 0).to(self.dtype)
        active = np.arange(most)[None, :] < n_steps[:, None]
        return index.to(self.device), mask.to(self.device), active

    def _run_epoch(
        self,
        x_all: torch.Tensor,
        gidx: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        active: np.ndarray,
        loss_sum: torch.Tensor,
    ) -> None:
        """Non-private steps of one epoch; ``gidx (S, steps, B)`` indexes the rows of ``x_all``."""
        if self._graphable(active):
            loss_sum += self._replay_epoch(("train",), {"x": x_all, "index": gidx, "y": y, "w": w}, self._train_body)
            return
        active_t = torch.as_tensor(active, dtype=loss_sum.dtype, device=self.device)
        all_active = bool(active.all())
        if self.native is not None:
            adam = self._native_adam()
            if adam is not None:
                # Blocks of steps, each copy's steps of a block one after another in one call.
                losses = [
                    self._native_block(adam, active, a, b, x_all, gidx[:, a:b], y[:, a:b], w[:, a:b])
                    for a, b in _blocks(active.shape[1], _STEPS_PER_CALL)
                ]
                if losses:
                    loss_sum += (torch.cat(losses, dim=1) * active_t).sum(dim=1)
                return
            grad = self._grad_buffer()
            step_losses = []
            for t, (index_t, y_t, w_t) in enumerate(zip(gidx.unbind(1), y.unbind(1), w.unbind(1), strict=True)):
                step_losses.append(self.native.train(self.flat, x_all, index_t, y_t, w_t, grad))
                self._optimizer_step(grad, active[:, t], all_active)
            if step_losses:
                loss_sum += (torch.stack(step_losses, dim=1) * active_t).sum(dim=1)
            return
        grad = self._grad_buffer()
        batch, features = gidx.shape[2], x_all.shape[1]

        def rows(a: int, b: int, t: int) -> torch.Tensor:
            return x_all.index_select(0, gidx[a:b, t].reshape(-1)).view(b - a, batch, features)

        blocks = [
            (a, b, views, self.step.resolve(views, rows(a, b, 0), y[a:b, 0], w[a:b, 0]))
            for (a, b), views in zip(self.blocks, self._block_views, strict=True)
        ]
        for t in range(active.shape[1]):
            for a, b, views, step in blocks:
                grads, losses = step(views, rows(a, b, t), y[a:b, t], w[a:b, t])
                flat_grads(grads, grad[a:b])
                loss_sum[a:b] += losses if all_active else losses * active_t[a:b, t]
            self._optimizer_step(grad, active[:, t])

    def _grad_buffer(self) -> torch.Tensor:
        """The ``(S, P)`` gradient buffer, made on first use (a native step with Adam inside needs none)."""
        if self._grad is None:
            self._grad = torch.empty_like(self.flat)
        return self._grad

    def _noise_streams(self, keys: Sequence[bytes]) -> GaussianNoise | DeviceGaussianNoise:
        """One noise stream per copy, from its key: AES-CTR on the CPU, the device's own
        generator elsewhere (drawing on the CPU would bound a GPU step)."""
        if self.device.type == "cpu":
            return GaussianNoise(keys, self.layout.size, self.dtype)
        if self._device_noise is None:
            self._device_noise = DeviceGaussianNoise(keys, self.layout.size, self.dtype, self.device)
        else:
            self._device_noise.reseed(keys)  # the same generators, which captured steps registered
        return self._device_noise

    # -- captured steps (CUDA graphs)

    def _graphable(self, active: np.ndarray) -> bool:
        """Whether this epoch runs as replays of a captured step: on CUDA, Adam, every copy
        stepping every step from the same step count (else the eager per-step path)."""
        return self.cuda_graphs and self.training.optimizer in ("adam", "adamw") and self._in_step(active)

    def _replay_epoch(
        self,
        kind: tuple[object, ...],
        inputs: dict[str, torch.Tensor],
        build: Callable[[EpochBuffers], Callable[[], None]],
        generators: Sequence[torch.Generator] = (),
    ) -> torch.Tensor:
        """One epoch (``inputs["index"]``: ``(S, steps, B)``) as replays of the step ``build``
        makes over the buffers; returns the epoch's summed loss per copy."""
        key = EpochBuffers.key(kind, inputs)
        buffers = self._graphs.get(key)
        if buffers is None:
            buffers = self._graphs[key] = EpochBuffers.like(inputs, self.n_copies)
        buffers.load(inputs)
        if buffers.step is None:  # built on loaded buffers: compiling the step runs it once
            buffers.step = ReplayedStep(build(buffers), generators, capture=self.device.type == "cuda")
        steps = int(inputs["index"].shape[1])
        self._step.fill_(float(self.counts[0]))
        buffers.step.run(steps)
        self.counts += steps
        return buffers.loss

    def _batch_at(self, buffers: EpochBuffers) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``t``'s rows of every copy: features ``(S, B, F)`` and their row ids ``(S * B,)``."""
        rows = buffers.at("index", self.n_copies).reshape(-1)
        x = buffers.inputs["x"].index_select(0, rows).view(self.n_copies, -1, buffers.inputs["x"].shape[1])
        return x, rows

    def _train_body(self, buffers: EpochBuffers) -> Callable[[], None]:
        """One non-private step of every copy at step ``t`` of the buffers (gradients, loss, Adam)."""
        grad, views, s = self._grad_buffer(), self.views, self.n_copies
        step = self.step.resolve(views, self._batch_at(buffers)[0], buffers.at("y", s), buffers.at("w", s))

        def body() -> None:
            grads, losses = step(views, self._batch_at(buffers)[0], buffers.at("y", s), buffers.at("w", s))
            flat_grads(grads, grad)
            buffers.loss.add_(losses)
            self._advance_adam(grad)
            buffers.t.add_(1)

        return body

    def _dp_body(self, std: Sequence[float], buffers: EpochBuffers) -> Callable[[], None]:
        """One DP-SGD step of every copy at step ``t`` of the buffers (noise from :attr:`_epoch_noise`,
        clipped gradients, loss, Adam)."""
        s, views = self.n_copies, self.views
        noise = torch.empty(s, self.layout.size, dtype=self.dtype, device=self.device)
        labels, clip = buffers.inputs["labels"], buffers.inputs["clip"]

        def args() -> tuple[Any, ...]:
            x, rows = self._batch_at(buffers)
            y = labels.index_select(0, rows).view(s, -1)
            return views, x, y, buffers.at("w", s), clip, noise, buffers.at("row_scale", s)

        step = self.dp_step.resolve(*args())

        def body() -> None:
            self._epoch_noise.draw(noise, std)  # type: ignore[union-attr]
            grad, losses = step(*args())
            buffers.loss.add_(losses * buffers.at("loss_weight", s))
            self._advance_adam(grad)
            buffers.t.add_(1)

        return body

    def _run_dp_epoch(
        self,
        tasks: Sequence[CopyTask],
        noise_streams: GaussianNoise | DeviceGaussianNoise,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        gidx: torch.Tensor,
        w: torch.Tensor,
        sizes: torch.Tensor,
        active: np.ndarray,
        loss_sum: torch.Tensor,
    ) -> None:
        """DP-SGD steps of one epoch; ``gidx (S, steps, width)`` indexes the rows of ``x_all``,
        of which the first ``sizes (S, steps)`` are each copy's Poisson batch."""
        dp = [task.dp for task in tasks]
        clip = torch.tensor([d.max_grad_norm for d in dp], dtype=self.dtype, device=self.device)  # type: ignore[union-attr]
        batch = torch.tensor([d.expected_batch_size for d in dp], dtype=self.dtype, device=self.device)  # type: ignore[union-attr]
        # The step weighs each real row by 1/B instead of dividing the (S, P) clipped sum by
        # B; the noise is drawn already divided (N(0, (sigma C)^2) / B is N(0, (sigma C / B)^2)).
        std = [d.noise_multiplier * d.max_grad_norm / d.expected_batch_size for d in dp]  # type: ignore[union-attr]
        real = (w > 0).to(self.dtype)
        row_scale = real / batch.view(-1, 1, 1)
        # The logged loss is the mean over a step's real rows (0 for an empty batch or a
        # step not taken), as the privacy plugin logs it; summed once per epoch.
        loss_weight = torch.as_tensor(active, dtype=loss_sum.dtype, device=self.device) / real.sum(dim=2).clamp_min(1).to(
            loss_sum.dtype
        )
        if self._graphable(active):
            # Captured steps run every step at the epoch's widest batch, padded further so
            # that few widths (each its own graph) occur; padding rows weigh nothing.
            pad = (0, -(-gidx.shape[2] // _GRAPH_DP_PAD) * _GRAPH_DP_PAD - gidx.shape[2])
            gidx, w, row_scale = (torch.nn.functional.pad(t, pad) for t in (gidx, w, row_scale))
            inputs = {
                "x": x_all, "labels": y_all, "index": gidx, "w": w, "row_scale": row_scale,
                "loss_weight": loss_weight, "clip": clip,
            }  # fmt: skip
            generators = noise_streams.generators if isinstance(noise_streams, DeviceGaussianNoise) else ()
            self._epoch_noise = noise_streams
            loss_sum += self._replay_epoch(("dp", *std), inputs, partial(self._dp_body, std), generators)
            return
        # Each step's noise is drawn right before it (a buffer of many steps would be read
        # back from memory, ~0.3 ms a step), by a helper thread while the step before runs:
        # on the paper's two cores, the federated group then takes more of the CPU than the
        # centralized one, which needs less. A copy not stepping draws nothing: its stream
        # never depends on its companions. (The native step with Adam inside draws the noise
        # itself; built without OpenSSL, it takes small blocks of steps, each block's noise
        # drawn while the one before trains.)
        every = bool(active.all())
        step_losses: list[torch.Tensor] = []  # (S, steps) each
        if self.native is not None:
            # The native step gathers each copy's rows itself and computes only its own
            # Poisson batch (the first sizes[s] rows), not the padding up to the widest one:
            # every step takes whole-width views of the epoch's tensors.
            y_epoch = y_all.index_select(0, gidx.reshape(-1)).view(gidx.shape)
            own = sizes.to(torch.long)
            adam = self._native_adam()
            if adam is not None and noise_library() is not None:
                # Each copy's noise drawn by the step itself, right before each of its steps:
                # it stays in the core's cache, and blocks are as long as without DP.
                assert isinstance(noise_streams, GaussianNoise)  # the native step runs on the CPU
                streams = noise_streams.native_streams(std)
                for a, b in _blocks(active.shape[1], _STEPS_PER_CALL):
                    part = (gidx[:, a:b], y_epoch[:, a:b], w[:, a:b])
                    dp = {"clip": clip, "row_scale": row_scale[:, a:b], "sizes": own[:, a:b], "streams": streams}
                    step_losses.append(self._native_block(adam, active, a, b, x_all, *part, **dp))
            elif adam is not None:
                assert isinstance(noise_streams, GaussianNoise)  # the native step runs on the CPU
                width = self.n_copies * self.layout.size * self.dtype.itemsize
                blocks = _blocks(active.shape[1], max(1, min(_STEPS_PER_CALL, _NOISE_BLOCK_BYTES // max(width, 1))))
                noises = noise_streams.per_block(std, active, [b - a for a, b in blocks])
                for (a, b), noise in zip(blocks, noises, strict=True):
                    part = (gidx[:, a:b], y_epoch[:, a:b], w[:, a:b])
                    dp = {"noise": noise, "clip": clip, "row_scale": row_scale[:, a:b], "sizes": own[:, a:b]}
                    step_losses.append(self._native_block(adam, active, a, b, x_all, *part, **dp))
            else:
                per_step = zip(gidx.unbind(1), y_epoch.unbind(1), w.unbind(1), row_scale.unbind(1), own.unbind(1), strict=True)
                noises = noise_streams.per_step(std, active)
                for t, (noise, (index_t, y_t, w_t, scale_t, own_t)) in enumerate(zip(noises, per_step, strict=True)):
                    losses = self.native.dp(self.flat, x_all, index_t, y_t, w_t, clip, noise, scale_t, own_t)
                    self._optimizer_step(noise, active[:, t], every)
                    step_losses.append(losses.unsqueeze(1))
        else:
            # Real rows come first in every padded batch: each step computes only as many
            # rows as its largest batch needs (rounded up, so few step shapes get compiled).
            largest = real.sum(dim=2).amax(dim=0).cpu().numpy().astype(np.int64)
            widths = np.maximum(self._dp_pad, -(-largest // self._dp_pad) * self._dp_pad).tolist()
            steps_by_width: dict[int, Callable[..., Any]] = {}
            for t, noise in enumerate(noise_streams.per_step(std, active)):
                k = widths[t]
                # Each step gathers its own rows at its own width (gathering the whole epoch
                # at its widest batch copies more), by index_select: ~5x faster than x[rows].
                rows = gidx[:, t, :k].reshape(-1)
                x_t = x_all.index_select(0, rows).view(self.n_copies, k, -1)
                y_t = y_all.index_select(0, rows).view(self.n_copies, k)
                args = (self.views, x_t, y_t, w[:, t, :k], clip, noise, row_scale[:, t, :k])
                step = steps_by_width.get(k)
                if step is None:
                    step = steps_by_width[k] = self.dp_step.resolve(*args)
                grad, losses = step(*args)
                self._optimizer_step(grad, active[:, t], every)
                step_losses.append(losses.unsqueeze(1))
        if step_losses:
            losses = torch.cat(step_losses, dim=1)
            loss_sum += (losses * loss_weight[:, : losses.shape[1]]).sum(dim=1)

    def _native_block(
        self, adam: AdamStep, active: np.ndarray, a: int, b: int, x_all: torch.Tensor, index: torch.Tensor,
        y: torch.Tensor, w: torch.Tensor, **dp: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Steps ``a .. b - 1`` of an epoch by the native step with Adam inside, each copy
        taking those of its steps that ``active`` marks (a prefix of the epoch's); the
        losses ``(S, b - a)``, 0 where a copy does not step.

        :param index: ``(S, b - a, B)`` rows of ``x_all`` (``y``, ``w`` likewise).
        :param dp: DP-SGD's ``noise`` (or ``streams``), ``clip``, ``row_scale`` and ``sizes`` (:meth:`NativeMLPStep.steps`).
        """
        taken = active[:, a:b].sum(axis=1)
        assert self.native is not None
        losses = self.native.steps(self.flat, x_all, index, y, w, adam, torch.from_numpy(taken), **dp)
        self._count(taken)
        adam.taken.copy_(torch.from_numpy(self.counts))
        return losses


def _blocks(steps: int, per_block: int) -> list[tuple[int, int]]:
    """``[a, b)`` blocks of at most ``per_block`` of ``steps`` steps, in order."""
    return [(a, min(a + per_block, steps)) for a in range(0, steps, per_block)]


# -------------------------------------------------------------- federated runs


class _FederatedRun(FederatedRun):
    """A federated run whose sites train as copies inside a stacked computation.

    Everything but local training (server, ledger, evaluation, records) is the
    sequential engine's :class:`~fedcore.engine.simulation.FederatedRun`, and every
    site's round is its :class:`~fedcore.engine.site.SiteRuntime`'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        reason = refusal(self.spec, self.components, self.data, [site.plan for site in self.sites])
        if reason is not None:
            self.close()
            raise ValueError(f"the vectorized engine cannot run this spec: {reason}")
        self.class_weights = [
            None if site.plan.class_weight is None else torch.as_tensor(site.plan.class_weight, dtype=torch.float32)
            for site in self.sites
        ]
        self.works: list[SiteRound] = []
        self.message: GlobalModel | None = None
        self._own_seconds = 0.0

    def copy_tasks(self, round_: int) -> list[CopyTask] | None:
        """Broadcast and begin every site's round; None when the run stopped."""
        began = time.perf_counter()
        broadcast = self.begin_round(round_)
        if broadcast is None:
            return None
        self.message, extras = broadcast
        try:
            self.works = [site.begin_round(self.message.weights, round_, extras) for site in self.sites]
        except PrivacyBudgetError as exc:
            self.stop(f"stopped in round {round_}: {exc}")
            return None
        self._own_seconds = time.perf_counter() - began
        return [
            CopyTask(work.x, work.y, site.generator, class_weight, site.plan.dp, round_)
            for site, work, class_weight in zip(self.sites, self.works, self.class_weights, strict=True)
        ]

    def release_round(
        self, round_: int, trained: Callable[[int], Weights], outcomes: Sequence[CopyOutcome], train_seconds: float
    ) -> None:
        """Each site's update from its trained copy (``trained(i)``: site ``i``'s weights, read
        one site at a time), then the shared end of the round."""
        began = time.perf_counter()
        updates = []
        share = train_seconds / max(len(self.sites), 1)
        for i, (site, work, outcome) in enumerate(zip(self.sites, self.works, outcomes, strict=True)):
            started = time.perf_counter()
            load_weights(site.module, trained(i))
            updates.append(site.end_round(work, outcome.steps, outcome.mean_loss, share, since=started))
        # Copies trained together share the training time: each run is charged its share,
        # plus what it spent alone (broadcast, updates, aggregation, ledger).
        self.finish_round(round_, updates, self._own_seconds + train_seconds + time.perf_counter() - began)


def _trained_copy(trainer: StackedTrainer, first_row: int, template: Weights, index: int) -> Weights:
    return trainer.copy_weights(first_row + index, template)


@dataclass
class EngineOptions:
    """Knobs of the vectorized engine that never change its numbers' meaning."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    backend: Backend = "auto"
    #: on CUDA, epochs as replays of a captured step (:mod:`fedcore.engine.cuda_graphs`)
    cuda_graphs: bool = True

    def trainer(self, module: torch.nn.Module, training: TrainingSpec, n_copies: int) -> StackedTrainer:
        """A :class:`StackedTrainer` with these options."""
        return StackedTrainer(
            module, training, n_copies, dtype=self.dtype, device=self.device, backend=self.backend, cuda_graphs=self.cuda_graphs
        )


def run_repeats_vectorized(
    spec: ExperimentSpec,
    jobs: Sequence[RunJob],
    arm: str,
    on_round: RoundCallback | None = None,
    options: EngineOptions | None = None,
) -> list[RunResult]:
    """Federated runs of one arm (several repeats) trained as one computation, round by round.

    Every run keeps its own server, sites, generators and ledger; only the copies'
    local training is shared, so each run's numbers are what it would get alone.
    """
    options = options or EngineOptions()
    group_start = time.perf_counter()
    runs: list[_FederatedRun] = []
    try:
        for job in jobs:
            runs.append(
                _FederatedRun(spec, job, arm, on_round)
            )
        template = jobs[0].components.model.build(jobs[0].data.n_features, jobs[0].data.n_classes)
        trainer: StackedTrainer | None = None
        trained_runs: list[_FederatedRun] = []
        # A resumed run joins the stack after the round it resumed from.
        for round_ in range(min(run.resumed_from for run in runs) + 1, spec.training.rounds + 1):
            tasks: list[CopyTask] = []
            active: list[_FederatedRun] = []
            for run in runs:
                if run.result.stopped_reason is None and round_ > run.resumed_from:
                    run_tasks = run.copy_tasks(round_)
                    if run_tasks is not None:
                        tasks += run_tasks
                        active.append(run)
            if not active:
                break
            if trainer is None or active != trained_runs:
                # A run stopped by its privacy budget leaves the stack; rebuilding is rare.
                n_copies = sum(len(run.sites) for run in active)
                trainer = options.trainer(template, spec.training, n_copies)
                trained_runs = active
            started = time.perf_counter()
            row = 0
            for run in active:
                trainer.set_copy(row, run.message.weights, len(run.sites))  # type: ignore[union-attr]
                row += len(run.sites)
            trainer.reset_optimizer()
            outcomes = trainer.train(tasks, spec.training.local_epochs)
            seconds = (time.perf_counter() - started) / len(active)
            row = 0
            for run in active:
                n = len(run.sites)
                trained = partial(_trained_copy, trainer, row, run.message.weights)  # type: ignore[union-attr]
                run.release_round(round_, trained, outcomes[row : row + n], seconds)
                row += n
    except BaseException:
        for run in runs:
            run.close()
        raise
    results = [run.close() for run in runs]
    # Runs trained together are charged an equal share of the group's wall time.
    share = (time.perf_counter() - group_start) / len(results)
    for result in results:
        result.wall_seconds = share
    return results


def run_federated_vectorized(
    spec: ExperimentSpec, job: RunJob, arm: str, on_round: RoundCallback | None = None, options: EngineOptions | None = None
) -> RunResult:
    """Drop-in for :func:`fedcore.engine.simulation.run_federated`: all sites of a round at once."""
    return run_repeats_vectorized(spec, [job], arm, on_round, options)[0]


# ------------------------------------------------------------- centralized runs


def run_centralized_vectorized(
    spec: ExperimentSpec,
    jobs: Sequence[RunJob],
    arm: str,
    on_round: RoundCallback | None = None,
    options: EngineOptions | None = None,
) -> list[RunResult]:
    """Centralized baselines of several repeats as one computation (one copy per repeat).

    Same as :func:`fedcore.engine.simulation.run_centralized` per repeat: the model from
    ``initial_module``, the pooled data, the generator ``derive_seed(seed, 3)``, one
    optimizer kept across epochs, evaluation on the pooled splits after each epoch.
    """
    options = options or EngineOptions()
    start = time.perf_counter()
    sites = [pooled_site(job.data) for job in jobs]
    generators = [torch.Generator().manual_seed(derive_seed(job.seed, 3)) for job in jobs]
    modules = [initial_module(job.components, job.data, job.seed) for job in jobs]
    template = jobs[0].components.model.build(jobs[0].data.n_features, jobs[0].data.n_classes)
    trainer = options.trainer(template, spec.training, len(jobs))
    initial = [weights_of(m) for m in modules]
    for i, weights in enumerate(initial):
        trainer.set_copy(i, weights)
    tasks = [
        CopyTask(torch.from_numpy(site.x_train), torch.from_numpy(site.y_train), generator)
        for site, generator in zip(sites, generators, strict=True)
    ]
    results = [RunResult(arm=arm, repeat=job.repeat, mode="centralized") for job in jobs]
    for epoch in range(1, spec.baseline_epochs + 1):
        epoch_start = time.perf_counter()
        outcomes = trainer.train(tasks, epochs=1)
        seconds = (time.perf_counter() - epoch_start) / len(jobs)
        for i, (job, site, module) in enumerate(zip(jobs, sites, modules, strict=True)):
            load_weights(module, trainer.copy_weights(i, initial[i]))
            record_epoch(
                results[i], module, site, job.data.n_classes, epoch, outcomes[i].mean_loss, seconds, on_round,
                spec.evaluation.metrics, scored_sites(spec, job.data),
            )
    wall = (time.perf_counter() - start) / len(jobs)
    for i, result in enumerate(results):
        result.wall_seconds = wall
        result.final_weights = trainer.copy_weights(i, initial[i])
    return results
