"""Base classes of every plugin component, and the local-training contract.

A component class has ``name`` (the name used in YAML ``use:``) and ``Settings``
(one pydantic model with ``extra="forbid"``). Capability flags are class
variables checked when the spec loads (see :func:`fedcore.spec.check_capabilities`).

The local-training contract
---------------------------
Privacy mechanisms, aggregators and attacks change what a site does in a round
through one seam, :class:`LocalTrainingStage`. A component returns a stage for
each site from :meth:`Component.site_stage`; the stage object lives at its site
for the whole run (so it *is* the per-site state kept between rounds: control
variates, accountant). The site runtime (:mod:`fedcore.engine.site`, the one reader
of these rules) calls, in order of the spec (aggregator, then ``privacy`` in list
order, then ``attacks``):

1. ``class_weights`` and ``dp_step`` once, when the site is set up (first non-None
   class weights win; at most one stage declares a DP-SGD step).
2. ``transform_training_data`` once per round, before training (label flipping).
3. ``sampler`` (first non-None wins; default: reshuffled fixed-size batches) and
   ``gradient_step`` (first non-None wins; default: mean loss, ``backward``), every round
   (a stage may check its budget here and refuse the round).
4. ``prepare`` with the module and optimizer (Opacus-style wrapping).
5. ``transform_gradients`` after each backward pass, before ``optimizer.step``.
6. ``finish`` after the last local step (update control variates, step accountants).
7. ``transform_update`` on the outgoing :class:`~fedcore.types.ClientUpdate`.

Seams 3-5 run inside the step loop. The vectorized engine executes the declared
:class:`DPStep` with its own stacked kernels instead of the declaring stage's sampler and
gradient step (which are that step's sequential reference), and refuses a site with any
other per-step seam, saying which.

On the server, :meth:`PrivacyMechanism.transform_sum` acts on the (secure) sum
before the aggregator applies it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.randomness import Secrets, derived_key
from fedcore.types import ClientUpdate, Frozen, LedgerHead, LedgerRecord, PrivacySpent, SecureSum, Weights

if TYPE_CHECKING:
    import torch

    from fedcore.audit import AuditContext, AuditSite
    from fedcore.spec import Components, ExperimentSpec


class NoSettings(BaseModel):
    """Settings of a component that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: a component's settings model: ``class FedAvgM(Aggregator[FedAvgMSettings])`` types ``self.settings``
SettingsT = TypeVar("SettingsT", bound=BaseModel)


class Component(Generic[SettingsT]):
    """Base of all plugin components, generic in its settings model.

    :cvar name: the name used in a spec's ``use:``.
    :cvar Settings: the pydantic model of the component's settings (``extra="forbid"``);
        name the same model as the type argument (``Aggregator[MySettings]``) and
        ``self.settings`` is typed as it.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel]] = NoSettings
    description: ClassVar[str] = ""
    settings: SettingsT

    def __init__(self, settings: BaseModel | None = None) -> None:
        self.settings = cast(SettingsT, settings if settings is not None else self.Settings())

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this component cannot run here (a missing optional dependency), or None."""
        return None

    def check_spec(self, spec: ExperimentSpec, components: Components) -> None:
        """Refuse a spec this component cannot honour; raise :class:`fedcore.errors.SpecError`.

        Called when the spec loads, before any data is read. ``components`` holds the
        spec's other components (for example ``components.dataset.will_oversample()``).
        """

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage | None:
        """The stage this component runs at ``site`` for the whole run, or None."""
        return None


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SiteData:
    """One hospital's preprocessed splits. Never leaves its site in a real deployment.

    Features are ``float32`` arrays of shape ``(rows, n_features)``, already preprocessed
    (numbers only, no NaN); labels are ``int64`` class indexes ``0 .. n_classes - 1``
    (into ``FederatedData.class_names``). A split may be empty (0 rows) but never absent.

    :ivar site: the site's index, ``0 .. n_sites - 1`` in ``FederatedData.sites`` order.
    :ivar name: the site's name (a hospital, a file's key), shown in the report.
    :ivar x_train: training features, ``float32 (rows, n_features)``.
    :ivar y_train: training labels, ``int64 (rows,)``.
    :ivar x_val: validation features (convergence is measured on this split).
    :ivar y_val: validation labels.
    :ivar x_test: test features (the tables report this split).
    :ivar y_test: test labels.
    """

    site: int
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_train(self) -> int:
        return int(len(self.y_train))

    def class_counts(self, n_classes: int) -> np.ndarray:
        return np.bincount(self.y_train, minlength=n_classes)


@dataclass(frozen=True)
class FederatedData:
    """What a dataset plugin returns: every site's splits plus what preprocessing did.

    A dataset plugin's ``load(seed)`` returns one; unusable input raises
    :class:`fedcore.errors.DataError` (one line naming the file, column or setting).
    Every site has the same ``feature_names`` (the columns of its ``x_*``).

    :ivar sites: every site's splits, ``sites[i].site == i``.
    :ivar feature_names: one name per feature column.
    :ivar class_names: one name per class; a label ``k`` means ``class_names[k]``.
    :ivar report_sections: Markdown sections for the run report (what was imputed,
        dropped, oversampled...), keyed by title.
    :ivar released_statistics: summaries that left the sites during preprocessing,
        by name, recorded on the ledger and listed as released outside the DP guarantee.
    :ivar max_rows_per_patient: the largest number of training rows of one patient at
        one site, when the data has a patient id (record-level DP reports a group bound).
    :ivar oversampled: whether training rows were duplicated or synthesized.
    """

    sites: list[SiteData]
    feature_names: list[str]
    class_names: list[str]
    report_sections: dict[str, str] = field(default_factory=dict)
    released_statistics: dict[str, Any] = field(default_factory=dict)
    max_rows_per_patient: int | None = None
    oversampled: bool = False

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


class Dataset(Component[SettingsT]):
    """Loads data for every site and preprocesses it (federatedly where statistics are needed)."""

    kind: ClassVar[str] = "dataset"
    #: whether ``load`` duplicates or synthesizes training rows under the given settings
    oversamples: ClassVar[bool] = False

    def will_oversample(self) -> bool:
        """Whether these settings make ``load`` duplicate or synthesize training rows."""
        return self.oversamples

    def load(self, seed: int) -> FederatedData:
        """Load and preprocess; raise :class:`fedcore.errors.DataError` for unusable input."""
        raise NotImplementedError


class Model(Component[SettingsT]):
    """Builds the torch module trained by every site."""

    kind: ClassVar[str] = "model"

    def build(self, n_features: int, n_classes: int) -> torch.nn.Module:
        """A freshly initialised module mapping ``(batch, n_features)`` to class logits."""
        raise NotImplementedError


# ------------------------------------------------------------ local training seam


@dataclass(frozen=True)
class SiteInfo:
    """What a component knows about a site when it creates the site's stage.

    :ivar site: the site's index.
    :ivar n_sites: how many sites the run has.
    :ivar n_train: the site's training rows.
    :ivar n_features: feature columns.
    :ivar n_classes: classes.
    :ivar class_counts: training rows per class at this site.
    :ivar batch_size: ``training.batch_size``.
    :ivar local_epochs: ``training.local_epochs`` (1 when ``local_steps`` is set).
    :ivar rounds: ``training.rounds``.
    :ivar seed: the training's seed (the spec's seed plus the repeat).
    :ivar max_rows_per_patient: ``FederatedData.max_rows_per_patient`` (group privacy), or None.
    """

    site: int
    n_sites: int
    n_train: int
    n_features: int
    n_classes: int
    class_counts: tuple[int, ...]
    batch_size: int
    local_epochs: int
    rounds: int
    seed: int
    max_rows_per_patient: int | None = None
    secrets: Secrets = field(default_factory=Secrets)
    """Where the site's DP noise keys come from (the OS CSPRNG unless the run is reproducible)."""
    local_steps: int | None = None
    """``training.local_steps``: optimizer steps per round instead of ``local_epochs`` epochs."""


@dataclass
class RoundContext:
    """Passed to stage methods for one site's round. ``global_weights`` is read-only.

    :ivar site: the site's index.
    :ivar round: the round, from 1 (the centralized baseline: the epoch).
    :ivar global_weights: the global model the round started from.
    :ivar generator: the site's torch generator (batches; never DP noise outside the reproducible mode).
    :ivar broadcast_extras: tensors the server broadcast with the model (SCAFFOLD's control variate...).
    """

    site: int
    round: int
    global_weights: Weights
    generator: torch.Generator
    broadcast_extras: dict[str, Weights] = field(default_factory=dict)


#: Bytes of a site's DP secret (:attr:`DPStep.secret`).
DP_SECRET_BYTES = 32
#: Bytes of one AES-128 noise key (as :data:`fedcore.noise.KEY_BYTES`).
NOISE_KEY_BYTES = 16

#: A batch source: yields ``(x, y)`` batches for one epoch.
BatchSampler = Callable[[int], Iterator[tuple["torch.Tensor", "torch.Tensor"]]]
#: Computes gradients into ``p.grad`` for a batch and returns the (detached) mean loss.
GradientStep = Callable[["torch.nn.Module", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class DPStep:
    """Record-level DP-SGD at one site, fixed before the run by calibration.

    Every local step: a Poisson batch (each training row independently with probability
    ``sample_rate``), each row's gradient clipped to L2 norm ``max_grad_norm`` (over all
    parameters together), summed, ``N(0, (noise_multiplier * max_grad_norm)^2)`` added per
    coordinate, divided by ``expected_batch_size``, as Opacus's ``DPOptimizer``.

    :ivar noise_multiplier: sigma; the noise std is ``sigma * max_grad_norm``.
    :ivar max_grad_norm: the per-sample clipping norm C.
    :ivar sample_rate: Poisson sampling probability q of each training row per step.
    :ivar expected_batch_size: ``q * n_train``, the divisor of the noisy gradient sum.
    :ivar steps_per_epoch: Poisson batches drawn per local epoch.
    :ivar local_epochs: local epochs per round.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: float
    steps_per_epoch: int
    local_epochs: int = 1
    secret: bytes = field(default_factory=lambda: os.urandom(DP_SECRET_BYTES), repr=False, compare=False)
    """The site's DP secret: every round's Poisson sampling and noise key derive from it
    (:meth:`sampling_generator`, :meth:`noise_key`). Fresh from the OS unless the stage
    passes one from ``SiteInfo.secrets`` (which follows ``execution.reproducible_noise``);
    never written to disk or released."""

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def sampling_generator(self, round: int) -> torch.Generator:
        """A new generator for round ``round``'s Poisson batches (every epoch draws from it in turn).

        Seeded with 64 bits derived from :attr:`secret`; the batches are never released.
        """
        import torch

        return torch.Generator().manual_seed(int.from_bytes(derived_key(self.secret, 8, "dp-sampling", round), "little"))

    def noise_key(self, round: int) -> bytes:
        """The AES key of round ``round``'s Gaussian noise stream (:class:`fedcore.noise.GaussianNoise`)."""
        return derived_key(self.secret, NOISE_KEY_BYTES, "dp-noise", round)

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.local_epochs


class LocalTrainingStage:
    """How one component changes one site's local training. Every method defaults to no change.

    Subclasses override only what they use; the engine detects overrides once per
    round, so an unused seam costs nothing per step.
    """

    def transform_training_data(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the training data to use this round (new tensors; inputs are not modified)."""
        return x, y

    def class_weights(self, class_counts: np.ndarray) -> np.ndarray | None:
        """Per-class loss weights, or None for an unweighted loss."""
        return None

    def dp_step(self) -> DPStep | None:
        """The record-level DP-SGD step this stage declares, or None.

        A stage that declares one implements it as its :meth:`sampler` and
        :meth:`gradient_step` too (what the sequential trainer runs); the vectorized
        engine runs the declared step with its stacked kernels.
        """
        return None

    def prepare(
        self, ctx: RoundContext, module: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap the module and optimizer for this round (for example for per-sample gradients)."""
        return module, optimizer

    def sampler(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, batch_size: int
    ) -> BatchSampler | None:
        """A batch sampler replacing the default shuffled batches (Poisson sampling for DP-SGD)."""
        return None

    def gradient_step(self, ctx: RoundContext, loss_fn: Callable[..., torch.Tensor]) -> GradientStep | None:
        """A replacement for ``loss.backward()`` (per-sample clipping and noise), or None."""
        return None

    def transform_gradients(self, ctx: RoundContext, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Adjust ``p.grad`` of the live training parameters in place after each backward pass.

        The one in-place seam: it runs every step, and copying every gradient per
        step would cost what the engine is built to avoid. It may touch only ``.grad``.
        """

    def finish(self, ctx: RoundContext, module: torch.nn.Module, steps: int) -> None:
        """Called once after local training with the number of optimizer steps taken."""

    def transform_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        """Return the update to release (clipped, noised, attacked...); never modify ``update``."""
        return update

    def privacy_spent(self) -> PrivacySpent | None:
        """What this site has spent so far, by its accountant, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The stage's state, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


# ------------------------------------------------------------------ server side


class Aggregator(Component[SettingsT]):
    """Turns the round's updates (or their secure sum) into new global weights.

    Aggregators that need only the weighted sum implement :meth:`aggregate_sum`
    and work under secure aggregation; those that look at individual updates
    (median, Krum) set ``needs_individual_updates`` and override :meth:`aggregate`.
    """

    kind: ClassVar[str] = "aggregator"
    needs_individual_updates: ClassVar[bool] = False

    def aggregate(self, round: int, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Weights:
        """New global weights from individual updates; default: :meth:`aggregate_sum` of their plain sum."""
        return self.aggregate_sum(round, global_weights, plain_sum(round, updates))

    def aggregate_sum(self, round: int, global_weights: Weights, summed: SecureSum) -> Weights:
        """New global weights from the sample-weighted sum of the updates."""
        raise NotImplementedError

    def broadcast_extras(self) -> dict[str, Weights]:
        """Extra tensors sent to sites with the global model (SCAFFOLD's server control variate)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Server state (momentum, moments...), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def plain_sum(round: int, updates: Sequence[ClientUpdate]) -> SecureSum:
    """The sum a secure aggregator would reveal, computed in the clear."""
    if not updates:
        raise ValueError("no updates to sum")
    template = updates[0].delta
    acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.arrays.items()}
    extras: dict[str, dict[str, np.ndarray]] = {}
    for update in updates:
        for k, v in update.delta.arrays.items():
            acc[k] += update.n_samples * v.astype(np.float64, copy=False)
        for name, w in update.extras.items():
            slot = extras.setdefault(name, {k: np.zeros(v.shape, dtype=np.float64) for k, v in w.arrays.items()})
            for k, v in w.arrays.items():
                slot[k] += v
    return SecureSum(
        round=round,
        weighted_delta_sum=Weights(arrays=acc),
        total_samples=sum(u.n_samples for u in updates),
        n_sites=len(updates),
        extras_sum={n: Weights(arrays=a) for n, a in extras.items()},
    )


class PrivacyMechanism(Component[SettingsT]):
    """Differential privacy: site stages (DP-SGD, update clipping and noise) and server noise."""

    kind: ClassVar[str] = "privacy"
    #: the unit this mechanism protects, as stated in reports
    unit: ClassVar[str] = "record"

    def transform_sum(self, summed: SecureSum, generator: np.random.Generator) -> SecureSum:
        """Server side: return the sum to aggregate (central DP adds noise here).

        :param summed: the (secure) sum of the round's released updates.
        :param generator: the server's seeded generator, for randomness that should
            replicate; DP noise must not come from it (it is predictable from the seed):
            draw noise keys from ``SiteInfo.secrets`` (:class:`fedcore.randomness.Secrets`).
        """
        return summed

    def refuse_round(self, round: int) -> str | None:
        """Why round ``round`` must not start (it would exceed the budget), or None.

        The engine asks before every round and stops the run, keeping the rounds
        done, when a mechanism refuses; a site stage may also raise
        :class:`fedcore.errors.PrivacyBudgetError` before its first step for the same effect.
        """
        return None

    def broadcast_extras(self) -> dict[str, Weights]:
        """Tensors sent to the sites with the global model (the round's clipping norm)."""
        return {}

    def privacy_spent(self, site_reports: Sequence[PrivacySpent]) -> PrivacySpent | None:
        """The run's privacy loss from the sites' accountants (default: the worst site)."""
        if not site_reports:
            return None
        return max(site_reports, key=lambda r: r.epsilon)


class SecureAggregator(Component[SettingsT]):
    """Reveals to the server only the weighted sum of the sites' updates."""

    kind: ClassVar[str] = "secure_aggregator"

    def open(self, n_sites: int, template: Weights) -> None:
        """Start whatever the protocol needs (party processes) before the first round."""

    def secure_sum(self, round: int, updates: Sequence[ClientUpdate]) -> SecureSum:
        """The weighted sum of ``updates`` computed without revealing any single one."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop party processes."""


@dataclass(frozen=True)
class LedgerVerification:
    """Result of re-checking a ledger: ``ok`` or the first bad entry's sequence number."""

    ok: bool
    entries: int
    first_bad_sequence: int | None = None
    message: str = ""


class Ledger(Component[SettingsT]):
    """Tamper-evident audit log of digests (spec, preprocessing, updates, aggregates, privacy)."""

    kind: ClassVar[str] = "ledger"
    continues_chain: ClassVar[bool] = False
    """True when :meth:`open` on an existing ledger directory continues its chain (``fedcore run --resume`` needs it)."""

    def open(self, directory: Path, participants: Sequence[str]) -> None:
        """Create or open the ledger under ``directory`` for the writers ``participants``."""

    def append(self, records: Sequence[LedgerRecord]) -> LedgerHead:
        """Append ``records`` atomically (one transaction) and return the signed new head."""
        raise NotImplementedError

    def close(self) -> dict[str, Any]:
        """Close and return a summary for the report (entries, bytes, timings, final head)."""
        return {}

    @classmethod
    def verify(cls, target: Path, keys: Path | None = None, head: str | None = None) -> LedgerVerification:
        """Re-check every entry of the ledger at ``target`` (a run directory or ledger file)."""
        raise NotImplementedError


class Attack(Component[SettingsT]):
    """A simulated misbehaving site (label flipping, scaled or sign-flipped updates)."""

    kind: ClassVar[str] = "attack"

    def attacked_sites(self) -> list[int]:
        """The sites this attack controls (settings ``sites`` by convention)."""
        return list(getattr(self.settings, "sites", []))


# ------------------------------------------------------------------------ audits


@dataclass(frozen=True)
class MembershipScores:
    """One site's membership scores for an attack: higher means "more likely a training row".

    Computed inside the site and never released; the core reduces them there to a
    :class:`SiteAttackStats`.
    """

    members: np.ndarray
    nonmembers: np.ndarray


class CountsAtLevels(Frozen):
    """Rows an attack flags as members at one threshold per FPR level (aligned with ``fpr_levels``)."""

    n_members: int
    n_nonmembers: int
    true_positives: list[int]
    false_positives: list[int]


class SiteAttackStats(Frozen):
    """What a site releases about one membership attack on its own rows: aggregates, no row.

    ``tpr_at_fpr`` uses thresholds set on all the site's non-members. ``selection``
    and ``evaluation`` split the targets in two halves: thresholds set on the
    selection half's non-members, applied to both halves (the lower bound picks its
    threshold on the selection half and is computed on the evaluation half only).
    """

    site: int
    n_members: int
    n_nonmembers: int
    auc: float
    fpr_levels: list[float]
    tpr_at_fpr: list[float]
    selection: CountsAtLevels
    evaluation: CountsAtLevels


class MembershipMetrics(Frozen):
    """An attack's success on one site (``site``) or pooled over sites (``site`` None)."""

    site: int | None
    n_members: int
    n_nonmembers: int
    auc: float
    tpr_at_fpr_1pct: float
    tpr_at_fpr_01pct: float


class EpsilonBound(Frozen):
    """An empirical lower bound on epsilon from an attack's best (TPR, FPR) pair.

    ``epsilon`` = max(0, ln((TPR_lo - delta) / FPR_hi), ln((TNR_lo - delta) / FNR_hi)) with
    Clopper-Pearson intervals at ``confidence``; ``exceeds_accounted`` marks a bound above
    the accountant's epsilon (a bug in the accounting, the mechanism or the audit).
    """

    attack: str
    epsilon: float
    direction: Literal["tpr/fpr", "tnr/fnr"]
    fpr_level: float
    tpr: float
    fpr: float
    tpr_interval: tuple[float, float]
    fpr_interval: tuple[float, float]
    n_members: int
    n_nonmembers: int
    delta: float
    confidence: float
    accounted_epsilon: float | None
    exceeds_accounted: bool


class AuditResult(Frozen):
    """What an audit returns for one (arm, repeat); the report renders it.

    :ivar released: each site's aggregate release (the only thing that left the sites).
    :ivar seconds: wall time of the audit, shadow training included.
    """

    audit: str
    attack: str
    per_site: list[MembershipMetrics] = Field(default_factory=list)
    pooled: MembershipMetrics | None = None
    bound: EpsilonBound | None = None
    released: list[SiteAttackStats] = Field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = Field(default_factory=list)


class Audit(Component[SettingsT]):
    """Measures what a finished model leaks: runs after training on each (arm, repeat)'s final model.

    The contract: :meth:`prepare` runs at the coordinator and may read only the
    :class:`~fedcore.audit.AuditContext` (the final model, the spec, the accounted
    privacy, earlier audits' results, and federated shadow training); :meth:`site_scores`
    runs inside one site with that site's members (training rows) and non-members
    (held-out rows of the same site, never the test split); the core reduces the scores
    to the site's :class:`SiteAttackStats` inside the site; :meth:`conclude` sees only
    those releases.
    """

    kind: ClassVar[str] = "audit"

    def prepare(self, context: AuditContext) -> Any:
        """Coordinator side, before the sites score (shadow models); the value goes to every site."""
        return None

    def site_scores(self, site: AuditSite, prepared: Any) -> MembershipScores | None:
        """Inside one site: a score per member and non-member, or None (an audit without a site part)."""
        return None

    def conclude(self, context: AuditContext, released: Sequence[SiteAttackStats]) -> AuditResult:
        """The audit's result from the sites' releases (and ``context``)."""
        raise NotImplementedError


# ---------------------------------------------------------------------- observers


class Observer(Component[SettingsT]):
    """Watches a run without changing it: an experiment tracker, a log (``observers:`` in a spec).

    Built once per ``fedcore run``, in the main process, from the spec's ``observers``
    list, and called at the run's lifecycle points (the same as the ``fedcore_run_start``
    ... ``fedcore_run_failed`` hooks). An observer that raises is logged by name and
    skipped; the run goes on. Every method defaults to doing nothing.
    """

    kind = "observer"

    def run_start(self, spec: ExperimentSpec, run_dir: Path, n_runs: int) -> None:
        """Before the first round.

        :param spec: the resolved spec (every default filled in; the sweep not expanded).
        :param run_dir: the run directory.
        :param n_runs: trainings the run executes (arms x repeats, baselines included).
        """

    def round_end(self, record: Any) -> None:
        """After every evaluated round (federated, cyclic) or epoch (centralized, local).

        :param record: the :class:`fedcore.types.RoundRecord` written to ``rounds.jsonl``.
        """

    def run_end(self, summary: dict[str, Any], run_dir: Path) -> None:
        """After ``summary.json``, ``report.md`` and the figures are written.

        :param summary: the content of ``summary.json``.
        :param run_dir: the run directory.
        """

    def run_failed(self, run_dir: Path, status: dict[str, Any]) -> None:
        """When the run stops early (an error, Ctrl-C, SIGTERM); ``run_end`` is not called then.

        :param run_dir: the run directory.
        :param status: the content of ``status.json`` (``state``, ``error``, ``job``...).
        """


@dataclass(frozen=True)
class Kind:
    """One kind of component: the one table the registry, spec loader, CLI and docs read.

    :ivar name: the kind's name (``Component.kind`` of its base class).
    :ivar base: the base class every component of the kind subclasses.
    :ivar hook: the registration hook that returns the kind's classes.
    :ivar slot: where a spec names it (``privacy``, ``data``...).
    :ivar label: how messages and ``fedcore plugins`` call it.
    :ivar many: whether the slot holds a list (``privacy: [...]``) or one reference.
    """

    name: str
    base: type[Component]
    hook: str
    slot: str
    label: str
    many: bool = False


KINDS: tuple[Kind, ...] = (
    Kind("dataset", Dataset, "fedcore_datasets", "data", "dataset"),
    Kind("model", Model, "fedcore_models", "model", "model"),
    Kind("aggregator", Aggregator, "fedcore_aggregators", "aggregator", "aggregator"),
    Kind("privacy", PrivacyMechanism, "fedcore_privacy_mechanisms", "privacy", "privacy mechanism", many=True),
    Kind("secure_aggregator", SecureAggregator, "fedcore_secure_aggregators", "secure_aggregation", "secure aggregator"),
    Kind("ledger", Ledger, "fedcore_ledgers", "ledger", "ledger"),
    Kind("attack", Attack, "fedcore_attacks", "attacks", "attack", many=True),
    Kind("audit", Audit, "fedcore_audits", "audits", "audit", many=True),
    Kind("observer", Observer, "fedcore_observers", "observers", "observer", many=True),
)
#: the kinds by name
KIND: dict[str, Kind] = {kind.name: kind for kind in KINDS}
#: kind name -> base class (a view of :data:`KINDS`)
COMPONENT_KINDS: dict[str, type[Component]] = {kind.name: kind.base for kind in KINDS}
