"""In-process simulation: sites and a server exchanging only boundary messages.

:class:`~fedcore.engine.site.SiteRuntime` holds one hospital's data and stages; :class:`Server` holds the
global model, the aggregator and the server side of privacy. They talk through
:class:`~fedcore.types.GlobalModel` and :class:`~fedcore.types.ClientUpdate`
(serializable), so a network transport can replace :func:`run_federated`'s
direct calls without touching any plugin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedcore.components import (
    Aggregator,
    FederatedData,
    LocalTrainingStage,
    PrivacyMechanism,
    RoundContext,
    SecureAggregator,
    SiteData,
    plain_sum,
)
from fedcore.checkpoint import CheckpointLayout, flush_to_disk, load_coordinator, part_digest, save_coordinator, weights_from_state, weights_state
from fedcore.commitments import Committer
from fedcore.errors import PrivacyBudgetError, RunFailure
from fedcore.engine.site import SiteRuntime, evaluate_at_sites, evaluate_split_pair
from fedcore.engine.stages import site_info, stages_for
from fedcore.engine.training import LocalTrainer, load_weights, weights_of
from fedcore.metrics import pool
from fedcore.randomness import Secrets
from fedcore.spec import Components, ExperimentSpec
from fedcore.types import (
    ClassificationMetrics,
    ClientUpdate,
    GlobalModel,
    LedgerRecord,
    PrivacySpent,
    RoundRecord,
    SiteEvaluation,
    Weights,
    json_bytes,
    json_digest,
)

RoundCallback = Callable[[RoundRecord], None]


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (same on every platform and process)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def site_name(site: int) -> str:
    return f"site-{site}"


def pooled(evaluations: Sequence[SiteEvaluation], split: str, names: Sequence[str] = ()) -> ClassificationMetrics:
    """The sites' metrics of ``split`` pooled (``names``: ``evaluation.metrics``, :func:`fedcore.metrics.pool`)."""
    metrics = [getattr(e, split) for e in evaluations]
    return pool(
        [np.asarray(getattr(e, f"{split}_confusion")) for e in evaluations],
        [m.loss for m in metrics],
        [m.n for m in metrics],
        names,
        [getattr(e, f"{split}_histogram") for e in evaluations],
    )


class Server:
    """Holds the global model; sees updates (or only their secure sum), never data."""

    def __init__(
        self,
        initial: Weights,
        aggregator: Aggregator,
        privacy: Sequence[PrivacyMechanism],
        secure_aggregator: SecureAggregator | None,
        seed: int,
    ) -> None:
        self.weights = initial
        self.aggregator = aggregator
        self.privacy = list(privacy)
        self.secure_aggregator = secure_aggregator
        self.rng = np.random.default_rng(seed)

    def broadcast(self, round: int) -> tuple[GlobalModel, dict[str, Weights]]:
        extras = dict(self.aggregator.broadcast_extras())
        for mechanism in self.privacy:
            extras.update(mechanism.broadcast_extras())
        return GlobalModel(round=round, weights=self.weights), extras

    def refuse_round(self, round: int) -> str | None:
        reasons = [r for r in (m.refuse_round(round) for m in self.privacy) if r]
        return "; ".join(reasons) or None

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Weights:
        if self.secure_aggregator is not None:
            summed = self.secure_aggregator.secure_sum(round, updates)
        elif type(self.aggregator).aggregate is not Aggregator.aggregate:
            # Robust aggregators look at individual updates; server-side privacy mechanisms
            # refuse such aggregators when the spec loads.
            self.weights = self.aggregator.aggregate(round, self.weights, updates)
            return self.weights
        else:
            summed = plain_sum(round, updates)
        for mechanism in self.privacy:
            summed = mechanism.transform_sum(summed, self.rng)
        self.weights = self.aggregator.aggregate_sum(round, self.weights, summed)
        return self.weights

    def privacy_spent(self, site_reports: Sequence[PrivacySpent]) -> list[PrivacySpent]:
        out: list[PrivacySpent] = []
        for mechanism in self.privacy:
            own = [r for r in site_reports if r.mechanism == mechanism.name]
            report = mechanism.privacy_spent(own)
            if report is not None:
                out.append(report)
        return out


@dataclass
class RunResult:
    """The outcome of one training (one arm, one repeat, federated or centralized)."""

    arm: str
    repeat: int
    mode: str
    records: list[RoundRecord] = field(default_factory=list)
    wall_seconds: float = 0.0
    ledger: dict[str, Any] = field(default_factory=dict)
    final_weights: Weights | None = None
    aggregator_state: dict[str, Any] = field(default_factory=dict)
    stopped_reason: str | None = None
    """Why the run ended before its last round (a privacy budget refused a round), or None."""
    audits: list[dict[str, Any]] = field(default_factory=list)
    """The spec's audits of the final model (:class:`fedcore.components.AuditResult` as JSON)."""


def initial_module(components: Components, data: FederatedData, seed: int) -> torch.nn.Module:
    torch.manual_seed(derive_seed(seed, 0))
    return components.model.build(data.n_features, data.n_classes)


def site_stages(
    spec: ExperimentSpec, components: Components, data: FederatedData, site: SiteData, seed: int, arm: str = "main"
) -> list[LocalTrainingStage]:
    """The stages of one site of this run (:func:`fedcore.engine.stages.stages_for`).

    :param arm: the sweep arm's label (unique within a run; ``main`` without a sweep), which
        with ``seed`` (the spec's seed plus the repeat) keys the site's secret randomness in
        reproducible mode, so arms and repeats never share noise. A deployed site gets the
        label from the coordinator, so a deployment and its simulation draw the same values.
    """
    secrets = Secrets(spec.execution.reproducible_noise, seed, arm)
    info = site_info(
        site, len(data.sites), data.n_features, data.n_classes, spec.training, seed, data.max_rows_per_patient, secrets
    )
    return stages_for(components, info)


def make_sites(
    spec: ExperimentSpec, components: Components, data: FederatedData, seed: int, arm: str = "main"
) -> list[SiteRuntime]:
    """Every hospital of the run, each with its own module, stages and generator (``arm``: :func:`site_stages`)."""
    return [
        SiteRuntime(
            site_data,
            components.model.build(data.n_features, data.n_classes),
            spec.training,
            site_stages(spec, components, data, site_data, seed, arm),
            data.n_classes,
            derive_seed(seed, 1, site_data.site),
            spec.evaluation.metrics,
        )
        for site_data in data.sites
    ]


def checkpoint_digest(spec: ExperimentSpec, repeat: int) -> str:
    """What a training's checkpoint parts must have been written by: the arm's spec (``execution`` aside), the repeat."""
    return json_digest({"spec": spec.model_dump(mode="json", exclude={"execution"}), "repeat": repeat})


@dataclass
class RunJob:
    """One training's own inputs: components (fresh per run: they hold its state), data, seed, ledger folder.

    :ivar checkpoints: where the run's checkpoint parts go after every round (None: none are written).
    :ivar resume_round: restore the parts of this round and continue after it (None: start afresh).
    """

    components: Components
    data: FederatedData
    repeat: int
    seed: int
    ledger_dir: Any = None
    checkpoints: CheckpointLayout | None = None
    resume_round: int | None = None


class FederatedRun:
    """One federated training driven round by round: server, sites, ledger, evaluation.

    :func:`run_federated` trains the sites one after another; the vectorized
    engine trains many runs' sites at once and hands the updates back to
    :meth:`finish_round`, so both engines share everything but local training.
    """

    def __init__(
        self,
        spec: ExperimentSpec,
        job: RunJob,
        arm: str,
        on_round: RoundCallback | None = None,
        sites: Sequence[Any] | None = None,
    ) -> None:
        """:param sites: the run's sites; default: every site of ``job.data``, each a
            :class:`~fedcore.engine.site.SiteRuntime` in this process (deployment passes
            proxies of remote sites and overrides the seams that talk to them).
        """
        components, data, seed, ledger_dir = job.components, job.data, job.seed, job.ledger_dir
        self.spec = spec
        self.components = components
        self.data = data
        self.on_round = on_round
        self.start = time.perf_counter()
        self.initial = weights_of(initial_module(components, data, seed))
        self.sites = list(sites) if sites is not None else make_sites(spec, components, data, seed, arm)
        self.server = Server(
            self.initial, components.aggregator, components.privacy, components.secure_aggregation, derive_seed(seed, 2)
        )
        self.result = RunResult(arm=arm, repeat=job.repeat, mode="federated")
        self.ledger = components.ledger
        self.ledger_head: str | None = None
        #: what sites released in a round the coordinator lost, by site (fedcore.engine.resume.Replay)
        self.replays: dict[int, Any] = {}
        #: the digest of the round's training request (with checkpoints: kept with each site's release)
        self.request = ""
        self.checkpoints = job.checkpoints
        #: the last round done before this process began (0 for a fresh run)
        self.resumed_from = job.resume_round or 0
        # Hiding commitments: each payload's opening stays with the party that made it.
        self.commits = Committer(ledger_dir if self.ledger is not None else None, spec.execution.reproducible_noise, seed, arm, job.repeat)
        if self.ledger is not None:
            self.ledger.open(ledger_dir, self.ledger_writers())
            opening = self.opening_records() if job.resume_round is None else []
            if opening:
                self._append(opening)
        if components.secure_aggregation is not None:
            components.secure_aggregation.open(len(self.sites), self.initial)
        if job.resume_round is not None:
            self.restore(job.resume_round)
        elif self.checkpoints is not None:
            self.save_sites(0)
            self.save_checkpoint(0, None)

    def _append(self, records: Sequence[LedgerRecord]) -> None:
        assert self.ledger is not None
        head = self.ledger.append(records)
        if head is not None:
            self.ledger_head = f"{head.sequence}:{head.entry_hash}"

    # -- checkpoints (fedcore.checkpoint; docs/reliability.md, "Resume")

    def spec_digest(self) -> str:
        return checkpoint_digest(self.spec, self.result.repeat)

    def save_sites(self, round_: int, updates: Sequence[ClientUpdate] = ()) -> None:
        """Every site writes its own part of ``round_``, as it releases its update (before it leaves the site)."""
        from fedcore.engine.resume import save_site_part

        layout = self.checkpoints
        assert layout is not None
        released = {u.site: u for u in updates}
        accounted = [
            save_site_part(
                layout,
                site_name(site.site),
                round_,
                site,
                None if site.site not in released else (self.request, released[site.site]),
            )
            for site in self.sites
        ]
        if any(accounted):
            flush_to_disk(layout.run_dir)  # one flush for every site's part (one disk in simulation)

    def save_checkpoint(self, round_: int, record: RoundRecord | None) -> None:
        """The coordinator's part after ``round_`` (0: the opening), written after the sites' parts.

        A round counts as complete only when every part is there (:func:`fedcore.checkpoint.last_complete_round`).
        """
        layout = self.checkpoints
        assert layout is not None
        aggregator = self.components.aggregator
        save_coordinator(
            layout,
            round_,
            {
                "spec": self.spec_digest(),
                "weights": weights_state(self.server.weights),
                "aggregator": aggregator.state_dict(),
                "privacy": [getattr(m, "state_dict", dict)() for m in self.server.privacy],
                "server_rng": self.server.rng.bit_generator.state,
                "ledger_head": self.ledger_head,
                "rounds_written": round_,
                "record": None if record is None else record.model_dump_json(),
                "sites": [site_name(site.site) for site in self.sites],
                "wall_seconds": time.perf_counter() - self.start,
                "stopped_reason": self.result.stopped_reason,
            },
        )

    def restore(self, round_: int) -> None:
        """Continue after ``round_``: the coordinator's part, then each site restores its own; the ledger says so."""
        from fedcore.engine.resume import restore_site

        layout = self.checkpoints
        assert layout is not None
        state = load_coordinator(layout, round_)
        if state.get("spec") != self.spec_digest():
            raise ValueError(f"{layout.coordinator_dir} was written by another spec or repeat")
        self.server.weights = weights_from_state(state["weights"])
        self.components.aggregator.load_state_dict(state["aggregator"])
        for mechanism, own in zip(self.server.privacy, state["privacy"], strict=True):
            if own:
                mechanism.load_state_dict(own)  # type: ignore[attr-defined]
        self.server.rng.bit_generator.state = state["server_rng"]
        self.result.records = [
            RoundRecord.model_validate_json(load_coordinator(layout, r)["record"] if r != round_ else state["record"])
            for r in range(1, round_ + 1)
        ]
        self.result.stopped_reason = state["stopped_reason"]
        self.start -= float(state["wall_seconds"])
        self.ledger_head = state["ledger_head"]
        self.commits.forget_after("server", round_)
        for site in self.sites:
            replay = restore_site(layout, site_name(site.site), round_, site)
            if replay is not None:
                self.replays[site.site] = replay
            self.commits.forget_after(site_name(site.site), round_)
        if self.ledger is not None:
            # Entries after the checkpoint's head (a round cut short) stay on the chain; this
            # entry marks where the run took up again, committing to the part it resumed from.
            self._append(
                [
                    LedgerRecord(
                        kind="resume",
                        round=round_,
                        writer="server",
                        payload_sha256=part_digest(layout, round_),
                        metadata={"resumed_after_round": round_, "checkpoint_head": state["ledger_head"]},
                    )
                ]
            )

    def begin_round(self, round_: int) -> tuple[GlobalModel, dict[str, Weights]] | None:
        """The round's broadcast, or None when a privacy mechanism refuses the round (the run stops)."""
        refusal = self.server.refuse_round(round_)
        if refusal is not None:
            self.stop(f"stopped before round {round_}: {refusal}")
            return None
        message, extras = self.server.broadcast(round_)
        if self.checkpoints is not None:
            from fedcore.engine.resume import request_digest

            self.request = request_digest(message, extras)
        return message, extras

    def run_round(self, round_: int, train: Callable[[GlobalModel, dict[str, Weights]], Sequence[ClientUpdate]]) -> bool:
        """One round: broadcast, ``train`` (the sites' released updates), aggregate and evaluate.

        Returns False when the run stops instead (a privacy budget refused the round).
        """
        round_start = time.perf_counter()
        broadcast = self.begin_round(round_)
        if broadcast is None:
            return False
        message, extras = broadcast
        try:
            updates = train(message, extras)
        except PrivacyBudgetError as exc:
            self.stop(f"stopped in round {round_}: {exc}")
            return False
        self.finish_round(round_, updates, time.perf_counter() - round_start)
        return True

    def stop(self, reason: str) -> None:
        """End the run early (a privacy budget refused a round); the rounds done are kept."""
        self.result.stopped_reason = reason
        self._charge_unreplayed()

    def _charge_unreplayed(self) -> None:
        """A release the run never asked for again stays charged at its site (its newest accountants)."""
        if not self.replays:
            return
        from fedcore.engine.resume import charged

        by_index = {site.site: site for site in self.sites}
        for index, replay in self.replays.items():
            site = by_index[index]
            site.load_state_dict(charged(site.state_dict(), replay.state))
        self.replays.clear()

    def replayed(self, round_: int, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """``updates``, where a site released this round before the crash: that release again, and its state after it.

        The site trained anew (the engines train every site alike); that update never leaves it.
        """
        out = list(updates)
        by_index = {site.site: site for site in self.sites}
        for i, update in enumerate(out):
            replay = self.replays.get(update.site)
            if replay is None or replay.round != round_:
                continue
            del self.replays[update.site]
            if replay.request_sha256 != self.request:
                # The coordinator's state is restored exactly, so this is a bug; going on would
                # charge the site's budget once for two releases.
                raise RunFailure(
                    f"{site_name(update.site)}: round {round_} asked again after resuming differs from the request "
                    "it answered before the crash; start a new run"
                )
            by_index[update.site].load_state_dict(replay.state)
            out[i] = replay.update()
        return out

    def finish_round(self, round_: int, updates: Sequence[ClientUpdate], seconds_so_far: float) -> None:
        """Aggregate the round's released updates, record them on the ledger, evaluate on every site."""
        began = time.perf_counter()
        if self.replays:
            updates = self.replayed(round_, updates)
        if self.checkpoints is not None:
            self.save_sites(round_, updates)
        records = self.update_records(round_, updates)
        new_weights = self.server.aggregate(round_, updates)
        # Under central DP this is the released (noised) model, never a pre-noise quantity.
        released = self.commits.commit("server", "aggregate", round_, new_weights.to_bytes())
        records.append(LedgerRecord(kind="aggregate", round=round_, writer="server", payload_sha256=released))
        privacy = self.server.privacy_spent([r for site in self.sites for r in site.privacy_spent()])
        for report in privacy:
            records.append(
                LedgerRecord(
                    kind="privacy-spent",
                    round=round_,
                    writer="server",
                    payload_sha256=json_digest(report.model_dump(mode="json")),
                    metadata={"epsilon": report.epsilon, "delta": report.delta, "unit": report.unit},
                )
            )
        if self.ledger is not None:
            self._append(records)
        round_seconds = seconds_so_far + time.perf_counter() - began
        evaluation_message = GlobalModel(round=round_, weights=new_weights)
        evaluations = self.evaluate_sites(evaluation_message)
        record = RoundRecord(
            arm=self.result.arm,
            repeat=self.result.repeat,
            round=round_,
            mode="federated",
            epoch=round_ * self.spec.training.local_epochs,
            validation=pooled(evaluations, "validation", self.spec.evaluation.metrics),
            test=pooled(evaluations, "test", self.spec.evaluation.metrics),
            per_site=[e.without_histograms() for e in evaluations],
            train_loss=float(np.mean([u.train_loss for u in updates])),
            round_seconds=round_seconds,
            update_bytes=[u.nbytes() for u in updates],
            update_seconds=[u.train_seconds for u in updates],
            privacy=privacy,
        )
        self.result.records.append(record)
        if self.checkpoints is not None:
            self.save_checkpoint(round_, record)
        if self.on_round is not None:
            self.on_round(record)

    def opening_records(self) -> list[LedgerRecord]:
        """The ledger's first records: the spec, the initial model, the released preprocessing statistics."""
        opening = [
            LedgerRecord(kind="spec", round=0, writer="server", payload_sha256=json_digest(self.spec.model_dump(mode="json"))),
            LedgerRecord(kind="global-model", round=0, writer="server", payload_sha256=self.initial.sha256()),
        ]
        for name, stats in sorted(self.data.released_statistics.items()):
            digest = self.commits.commit("server", "preprocessing", 0, json_bytes(stats), name)
            opening.append(
                LedgerRecord(kind="preprocessing", round=0, writer="server", payload_sha256=digest, metadata={"name": name})
            )
        return opening

    def ledger_writers(self) -> list[str]:
        """Whose keys sign ledger entries: the server and every site."""
        return ["server", *(site_name(s.site) for s in self.sites)]

    def update_records(self, round_: int, updates: Sequence[ClientUpdate]) -> list[LedgerRecord]:
        """The ledger records of the round's released updates, one per site."""
        return [
            LedgerRecord(
                kind="site-update",
                round=round_,
                writer=site_name(u.site),
                payload_sha256=self.commits.update(site_name(u.site), u),
                metadata={"n_samples": u.n_samples, "bytes": u.nbytes()},
            )
            for u in updates
        ]

    def evaluate_sites(self, message: GlobalModel) -> list[SiteEvaluation]:
        """Every site's evaluation of the new global model: each site's
        :meth:`~fedcore.engine.site.SiteRuntime.evaluate`, computed for all of them in one
        pass (:func:`~fedcore.engine.site.evaluate_at_sites`: the same numbers)."""
        module = self.sites[0].module
        load_weights(module, message.weights)
        return evaluate_at_sites(module, [site.data for site in self.sites], self.data.n_classes, self.spec.evaluation.metrics)

    def close(self) -> RunResult:
        """Stop the secure aggregator and close the ledger; the run's result."""
        self._charge_unreplayed()
        try:
            if self.components.secure_aggregation is not None:
                self.components.secure_aggregation.close()
        finally:
            if self.ledger is not None:
                self.result.ledger = self.ledger.close()
        self.result.wall_seconds = time.perf_counter() - self.start
        self.result.final_weights = self.server.weights
        self.result.aggregator_state = self.components.aggregator.state_dict()
        return self.result


def run_federated(
    spec: ExperimentSpec, job: RunJob, arm: str, on_round: RoundCallback | None = None, stop_after_rounds: int | None = None
) -> RunResult:
    """Train one federated run: every round, every site one after another, then evaluate."""
    run = FederatedRun(spec, job, arm, on_round)
    rounds = spec.training.rounds if stop_after_rounds is None else min(stop_after_rounds, spec.training.rounds)
    try:
        for round_ in range(run.resumed_from + 1, rounds + 1):
            if run.result.stopped_reason is not None:
                break
            if not run.run_round(round_, lambda message, extras: [site.fit(message.weights, message.round, extras) for site in run.sites]):
                break
    finally:
        result = run.close()
    return result


def pooled_site(data: FederatedData) -> SiteData:
    """All sites' splits concatenated: the centralized baseline's data."""
    def cat(attr: str) -> np.ndarray:
        return np.concatenate([getattr(s, attr) for s in data.sites])

    return SiteData(
        site=-1,
        name="pooled",
        x_train=cat("x_train"),
        y_train=cat("y_train"),
        x_val=cat("x_val"),
        y_val=cat("y_val"),
        x_test=cat("x_test"),
        y_test=cat("y_test"),
    )


def scored_sites(spec: ExperimentSpec, data: FederatedData) -> Sequence[SiteData]:
    """The sites the centralized model is also scored at: every one when the spec asks for the
    local-only or cyclic baseline (the per-site rows of an FL comparison), else none."""
    return data.sites if spec.baseline.local or spec.baseline.cyclic else ()


def record_epoch(
    result: RunResult,
    module: torch.nn.Module,
    site: SiteData,
    n_classes: int,
    epoch: int,
    train_loss: float,
    seconds: float,
    on_round: RoundCallback | None,
    metrics: Sequence[str] = (),
    per_site: Sequence[SiteData] = (),
) -> None:
    """Evaluate a centralized baseline after ``epoch`` on the pooled splits and record it
    (``metrics``: ``evaluation.metrics``; ``per_site``: the sites to score it at as well)."""
    evaluation = evaluate_split_pair(module, site, n_classes, metrics)
    at_sites = [e.without_histograms() for e in evaluate_at_sites(module, per_site, n_classes, metrics)] if per_site else []
    append_record(
        result, on_round, round=epoch, epoch=epoch, validation=evaluation.validation, test=evaluation.test,
        per_site=at_sites, train_loss=train_loss, round_seconds=seconds,
    )


def append_record(result: RunResult, on_round: RoundCallback | None, **fields: Any) -> None:
    """A baseline's round record (``fields`` of :class:`RoundRecord`): kept in ``result`` and streamed to ``on_round``."""
    record = RoundRecord(arm=result.arm, repeat=result.repeat, mode=result.mode, **fields)
    result.records.append(record)
    if on_round is not None:
        on_round(record)


def run_centralized(spec: ExperimentSpec, job: RunJob, arm: str, on_round: RoundCallback | None = None) -> RunResult:
    """The study's comparison: the same model and optimizer on the pooled training data."""
    start = time.perf_counter()
    data, seed = job.data, job.seed
    module = initial_module(job.components, data, seed)
    site = pooled_site(data)
    trainer = LocalTrainer(module, spec.training)
    generator = torch.Generator().manual_seed(derive_seed(seed, 3))
    x, y = torch.from_numpy(site.x_train), torch.from_numpy(site.y_train)
    initial = weights_of(module)
    result = RunResult(arm=arm, repeat=job.repeat, mode="centralized")
    for epoch in range(1, spec.baseline_epochs + 1):
        epoch_start = time.perf_counter()
        ctx = RoundContext(-1, epoch, initial, generator)
        outcome = trainer.run(ctx, x, y, epochs=1, keep_optimizer=True)
        record_epoch(
            result, module, site, data.n_classes, epoch, outcome.mean_loss, time.perf_counter() - epoch_start, on_round,
            spec.evaluation.metrics, scored_sites(spec, data),
        )
    result.wall_seconds = time.perf_counter() - start
    result.final_weights = weights_of(module)
    return result
