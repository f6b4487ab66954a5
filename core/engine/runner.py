"""Runs a whole experiment: every sweep arm x repeat, plus centralized baselines.

Trainings are independent jobs. With more than one worker they run in separate
processes (one torch thread each, which measured faster than two threads for
the paper's small MLP); rounds stream back to this process, which alone writes
``rounds.jsonl``, drives the progress bars and calls the observer hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing.managers import SyncManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedcore import rundir
from fedcore.cache import run_shared_results, share_results_in, shared_results
from fedcore.components import FederatedData
from fedcore.engine import processes
from fedcore.checkpoint import CheckpointError, CheckpointLayout, last_complete_round, load_coordinator, prune, training_key
from fedcore.commitments import OPENINGS_DIR
from fedcore.engine.resume import load_result, save_result
from fedcore.engine.simulation import RunJob, RunResult, checkpoint_digest, run_centralized, run_federated, site_name
from fedcore.errors import FedcoreUserError, SpecError
from fedcore.noise import allow_helper
from fedcore.registry import PluginManager
from fedcore.report.summary import baseline_key
from fedcore.spec import ExecutionSpec, Experiment, ExperimentSpec, arm_indexes, build_components, locate, resolved_yaml
from fedcore.types import RoundRecord


@dataclass(frozen=True)
class EngineChoice:
    """Which engine trains an arm, and why not the vectorized one when it does not."""

    engine: str
    reason: str | None = None

    @property
    def vectorized(self) -> bool:
        return self.engine == "vectorized"


@dataclass(frozen=True, eq=False)
class Job:
    """One training: an arm's federated run or a centralized baseline, for one repeat.

    What a worker process receives: the validated spec and the engine chosen for the arm
    (nothing is parsed or decided again there).
    """

    arm: str
    repeat: int
    mode: str
    spec: ExperimentSpec
    seed: int
    engine: EngineChoice
    resume_round: int | None = None
    """On resume: the round whose checkpoint parts this training continues after (None: from the start)."""

    @property
    def key(self) -> str:
        return f"{self.mode}:{self.arm}:{self.repeat}"

    def layout(self, run_dir: Path) -> CheckpointLayout:
        """Where this training's checkpoint parts and finished result live."""
        return CheckpointLayout(run_dir, training_key(self.mode, self.arm, self.repeat))


#: the local-only and cyclic baselines' engine (fedcore.engine.baselines)
SEQUENTIAL_BASELINE = EngineChoice("sequential", "the local-only and cyclic baselines run on the sequential engine")


def plan_jobs(experiment: Experiment, engines: dict[str, EngineChoice]) -> list[Job]:
    """Federated jobs for every arm and repeat; each baseline once per distinct (data, model, training, baseline)."""
    jobs: list[Job] = []
    spec = experiment.spec
    for repeat in range(spec.repeats):
        seed = spec.seed + repeat
        seen: set[str] = set()
        for arm in experiment.arms:
            engine = engines[arm.label]
            key = baseline_key(arm.spec)
            if key not in seen:
                seen.add(key)
                jobs += [
                    Job(arm.label, repeat, mode, arm.spec.as_baseline(), seed, engine if mode == "centralized" else SEQUENTIAL_BASELINE)
                    for mode in arm.spec.baseline.modes()
                ]
            jobs.append(Job(arm.label, repeat, "federated", arm.spec, seed, engine))
    return jobs


_DATA_CACHE: dict[tuple[str, int], FederatedData] = {}
#: the preprocessed data a process keeps for its next jobs: a repeat's federated and
#: centralized trainings (and its audits) use the same data, loaded once
_DATA_CACHE_BYTES = 1 << 30


def _data_bytes(data: FederatedData) -> int:
    return sum(
        a.nbytes for s in data.sites for a in (s.x_train, s.y_train, s.x_val, s.y_val, s.x_test, s.y_test)
    )


def load_data(spec: ExperimentSpec, seed: int, plugins: PluginManager) -> FederatedData:
    """Load (once per process, within :data:`_DATA_CACHE_BYTES`) the data of a spec's data settings and seed."""
    key = (spec.data.model_dump_json(), seed)
    if key not in _DATA_CACHE:
        data = build_components(spec, plugins).dataset.load(seed)
        size = _data_bytes(data)
        while _DATA_CACHE and sum(map(_data_bytes, _DATA_CACHE.values())) + size > _DATA_CACHE_BYTES:
            del _DATA_CACHE[next(iter(_DATA_CACHE))]  # the oldest first
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


def preflight(experiment: Experiment) -> dict[str, EngineChoice]:
    """Load the first repeat's data and create every site's stages before anything is written.

    Bad data and impossible privacy budgets fail here, as user errors, with no run
    directory left behind. Returns, per arm, the engine that runs it and why.
    """
    spec = experiment.spec
    choices: dict[str, EngineChoice] = {}
    for arm in experiment.arms:
        try:
            data = load_data(arm.spec, spec.seed, experiment.plugins)
            choices[arm.label] = engine_for(arm.spec, build_components(arm.spec, experiment.plugins), data)
        except FedcoreUserError as exc:
            raise locate(exc, experiment.source.for_arm(arm_indexes(experiment, arm))) from None
    return choices


def engine_for(spec: ExperimentSpec, components: Any, data: FederatedData) -> EngineChoice:
    """The engine for ``spec`` on ``data``: creates every site's stages (as a run does) and reads them."""
    from fedcore.engine.simulation import site_stages
    from fedcore.engine.stages import StagePlan

    plans = [
        StagePlan.of(site_stages(spec, components, data, site, spec.seed), site.class_counts(data.n_classes))
        for site in data.sites
    ]
    return choose_engine(spec, components, data, plans)


def choose_engine(spec: ExperimentSpec, components: Any, data: FederatedData, plans: Any) -> EngineChoice:
    """The engine for ``spec``: vectorized where it runs every site's plan, else sequential (and why)."""
    if spec.execution.engine == "sequential":
        return EngineChoice("sequential", "execution.engine: sequential")
    if spec.execution.device == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            "execution.device is cuda but no CUDA device is available", where="execution.device", hint="use device: cpu"
        )
    from fedcore.engine import vectorized

    reason = vectorized.refusal(spec, components, data, plans)
    if reason is None and spec.training.local_steps is not None:
        reason = "training.local_steps: the vectorized engine trains whole epochs"
    if reason is not None and (spec.execution.engine == "vectorized" or spec.execution.device == "cuda"):
        raise SpecError(
            f"the vectorized engine cannot run this spec: {reason}",
            where="execution.engine",
            hint="use engine: auto (falls back to the sequential engine) or engine: sequential, on device: cpu",
        )
    return EngineChoice("sequential", reason) if reason is not None else EngineChoice("vectorized")


def execution_units(jobs: list[Job], workers: int, cost: UnitCost) -> list[list[Job]]:
    """Jobs grouped into what one process runs at once.

    Repeats of a vectorized arm train together (one stacked computation); everything else
    runs one job at a time. A stacked group is split in two (its repeats alternating) only
    while that shortens the run by ``cost``'s estimate with ``workers`` processes: a split
    lets both cores work, yet each half pays the per-step overhead that the whole group
    paid once. With the TorchScript steps, ``specs/paper.yaml`` on 2 cores ran its federated
    and centralized groups on one core each; with the native step (overhead ~0.5 copies) both
    groups are halved, each core training half of each.
    """
    units: list[list[Job]] = []
    groups: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        if job.engine.vectorized:
            groups.setdefault((job.mode, job.arm), []).append(job)
        else:
            units.append([job])
    units += groups.values()
    best = makespan(units, workers, cost)
    while True:
        splittable = [i for i, unit in enumerate(units) if len(unit) > 1 and unit[0].engine.vectorized]
        splits = [[*units[:i], *_halves(units[i]), *units[i + 1 :]] for i in splittable]
        if len(splittable) > 1:
            # Every group halved at once: with a small per-step overhead, two groups of
            # unequal cost balance over two workers only when both are split (the paper's).
            splits.append([part for i, unit in enumerate(units) for part in (_halves(unit) if i in splittable else [unit])])
        scored = sorted(((makespan(s, workers, cost), n, s) for n, s in enumerate(splits)), key=lambda t: t[:2])
        if not scored or scored[0][0] >= best * (1 - 1e-9):
            return units
        best, _, units = scored[0]


def _halves(unit: list[Job]) -> list[list[Job]]:
    """A stacked group split in two, its repeats alternating."""
    return [unit[0::2], unit[1::2]]


#: estimated seconds (relative) of a unit of jobs trained together
UnitCost = Callable[[list[Job]], float]


def makespan(units: list[list[Job]], workers: int, cost: UnitCost) -> float:
    """The estimated end of the last worker when ``units``, longest first, go to whichever worker is free first."""
    loads = [0.0] * max(1, workers)
    for unit_cost in sorted((cost(u) for u in units), reverse=True):
        loads[loads.index(min(loads))] += unit_cost
    return max(loads)


#: per-step overhead of a stacked step, in copies' worth of arithmetic, by how the step runs
#: (paper MLP, 2-core CPU). TorchScript steps: a non-private step of S copies takes ~(S + 4) x,
#: a DP-SGD step ~1.3 (S + 8) x one copy's rows. The native MLP step (fedcore.engine.native):
#: a copy's step costs the same at S = 3 and S = 30 (66 and 64 us non-private, 91 and 93 us
#: DP-SGD with its noise), so the per-step Python left is ~0.5 copies' worth, and a DP row 1.4x.
_STEP_OVERHEAD = {"compiled": {False: 4.0, True: 8.0}, "native": {False: 0.5, True: 0.5}}
_DP_ROW_COST = {"compiled": 1.3, "native": 1.4}


def _step_kind(spec: ExperimentSpec, plugins: PluginManager, data: FederatedData) -> str:
    """``native`` where the vectorized engine will run this arm's steps natively, else ``compiled``."""
    from fedcore.engine.native import NativeMLPStep
    from fedcore.engine.vectorized_step import ParamLayout

    module = build_components(spec, plugins).model.build(data.n_features, data.n_classes)
    native = NativeMLPStep.of(module, ParamLayout.of(module), torch.float32, torch.device(spec.execution.device))
    return "compiled" if native is None else "native"


def unit_cost_model(experiment: Experiment) -> UnitCost:
    """Estimated cost of a unit: its copies' training rows x epochs, with each step's fixed
    overhead shared by the copies that step together (``rows x epochs x (1 + overhead / S)``)."""
    shape = {}
    for arm in experiment.arms:
        data = load_data(arm.spec, experiment.spec.seed, experiment.plugins)
        shape[arm.label] = (sum(s.n_train for s in data.sites), len(data.sites), _step_kind(arm.spec, experiment.plugins, data))

    def cost(unit: list[Job]) -> float:
        rows, sites, kind = shape[unit[0].arm]
        if not unit[0].engine.vectorized:
            return sum(_job_work(job, rows) for job in unit)
        dp = _private(unit[0])
        copies = len(unit) * (sites if unit[0].mode == "federated" else 1)
        row_cost = _DP_ROW_COST[kind] if dp else 1.0
        return sum(_row_epochs(job, rows) for job in unit) * row_cost * (1 + _STEP_OVERHEAD[kind][dp] / copies)

    return cost


def _save_checkpoint(job: Job, result: RunResult, run_dir: Path, data: FederatedData) -> None:
    """A finished training: its final weights (and aggregator state), then its result, which marks it finished.

    Its per-round parts are then pruned to the last one: a resumed run never trains it again.
    """
    layout = job.layout(run_dir)
    if job.spec.execution.checkpoints and result.final_weights is not None:
        ckpt = run_dir / "checkpoints"
        ckpt.mkdir(parents=True, exist_ok=True)
        np.savez(ckpt / f"{layout.key}.npz", **dict(result.final_weights.arrays))
        if result.aggregator_state:
            torch.save(result.aggregator_state, ckpt / f"{layout.key}-aggregator.pt")
    save_result(layout, result)
    if job.mode == "federated" and job.spec.execution.checkpoints:
        prune(layout, [site_name(site.site) for site in data.sites], keep=1)
    result.final_weights = None  # not needed past the checkpoint; keeps results small to pickle


def _audit(job: Job, result: RunResult, plugins: PluginManager) -> None:
    """The spec's audits on a federated (arm, repeat)'s final model, after its training (fedcore.audit)."""
    if job.mode != "federated" or not job.spec.audits or result.final_weights is None:
        return
    from fedcore.audit import run_audits

    privacy = result.records[-1].privacy if result.records else []
    data = load_data(job.spec, job.seed, plugins)
    audits = run_audits(job.spec, plugins, data, result.final_weights, privacy, job.seed, job.arm)
    result.audits = [a.model_dump(mode="json") for a in audits]


def _ledger_dir(run_dir: Path, job: Job) -> Path:
    return run_dir / "ledger" / f"{_slug(job.arm)}-r{job.repeat}"


def execute_unit(
    unit: list[Job],
    run_dir: Path,
    plugins: PluginManager | None,
    on_round: Callable[[RoundRecord], None] | None,
) -> list[RunResult]:
    """Run a unit in this process: one job sequentially, or a group of repeats vectorized."""
    if not unit[0].engine.vectorized:
        return [execute_job(job, run_dir, plugins, on_round) for job in unit]
    plugins = plugins or PluginManager()
    runs = [run_job(j, run_dir, plugins) for j in unit]
    results = train_runs(unit[0].spec, runs, unit[0].arm, unit[0].mode, unit[0].engine, on_round)
    for job, run, result in zip(unit, runs, results, strict=True):
        _audit(job, result, plugins)
        _save_checkpoint(job, result, run_dir, run.data)
    return results


def train_runs(
    spec: ExperimentSpec,
    runs: list[RunJob],
    arm: str,
    mode: str,
    engine: EngineChoice,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> list[RunResult]:
    """One training per ``runs`` entry (repeats of one arm, ``mode`` federated or centralized), by ``engine``.

    The vectorized engine trains them as one stacked computation; the sequential one, one after another.
    """
    if not engine.vectorized:
        return [trainer(mode)(spec, run, arm, on_round) for run in runs]
    from fedcore.engine import vectorized as vec

    options = vec.EngineOptions(device=spec.execution.device)
    if mode == "centralized":
        return vec.run_centralized_vectorized(spec, runs, arm, on_round, options)
    return vec.run_repeats_vectorized(spec, runs, arm, on_round, options)


def trainer(mode: str) -> Callable[..., RunResult]:
    """The sequential engine's training of ``mode`` (federated, centralized, local, cyclic)."""
    from fedcore.engine.baselines import run_cyclic, run_local

    return {"federated": run_federated, "centralized": run_centralized, "local": run_local, "cyclic": run_cyclic}[mode]


def run_job(job: Job, run_dir: Path, plugins: PluginManager) -> RunJob:
    """A job's own inputs in this process: fresh components, the (cached) data, its ledger folder."""
    data = load_data(job.spec, job.seed, plugins)
    checkpoints = job.layout(run_dir) if job.spec.execution.checkpoints else None
    return RunJob(
        build_components(job.spec, plugins), data, job.repeat, job.seed, _ledger_dir(run_dir, job), checkpoints, job.resume_round
    )


def execute_job(
    job: Job,
    run_dir: Path,
    plugins: PluginManager | None,
    on_round: Callable[[RoundRecord], None] | None,
) -> RunResult:
    """Run one job in this process."""
    plugins = plugins or PluginManager()
    run = run_job(job, run_dir, plugins)
    result = trainer(job.mode)(job.spec, run, job.arm, on_round)
    _audit(job, result, plugins)
    _save_checkpoint(job, result, run_dir, run.data)
    return result


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "main"


_WORKER_QUEUE: Any = None


def _worker_init(
    events: Any, threads: int, parent_pid: int | None = None, shared: Path | None = None, spare_cores: bool = True
) -> None:
    """A worker process's setup; ``spare_cores``: the workers leave cores idle (a DP step's
    noise may then be drawn ahead in a helper thread: :func:`fedcore.noise.allow_helper`)."""
    global _WORKER_QUEUE
    processes.die_with_parent(parent_pid)
    # A forked worker inherits the command line's SIGTERM handler; it stops at SIGTERM as a
    # spawned one does.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER_QUEUE = events
    share_results_in(shared)
    torch.set_num_threads(threads)
    # numpy's BLAS (OpenBLAS) too: its default pool of one thread a core spins on the cores
    # the other workers train on (1.6 % of the paper run's CPU samples went to its idle threads).
    threadpool_limits(threads, user_api="blas")
    allow_helper(spare_cores)


def _worker_run(unit: list[Job], run_dir: str) -> list[RunResult]:
    return execute_unit(unit, Path(run_dir), None, _WORKER_QUEUE.put)


def default_workers(experiment: Experiment, units: list[list[Job]]) -> int:
    """Workers for ``units``: as many as the work pays for (see :func:`processes.default_workers`).

    The training rows of each arm come from its first repeat's data, which the preflight loaded.
    On a GPU, one: worker processes would take turns on the device (``specs/paper.yaml`` on an
    H200: 77 s with one worker, 122 s with two).
    """
    if experiment.spec.execution.device == "cuda":
        return 1
    seed, plugins = experiment.spec.seed, experiment.plugins
    rows = {arm.label: sum(s.n_train for s in load_data(arm.spec, seed, plugins).sites) for arm in experiment.arms}
    work = sum(_job_work(job, rows[job.arm]) for unit in units for job in unit)
    return processes.default_workers(len(units), work)


def timestamped_run_dir(spec: ExperimentSpec, out: Path | None) -> Path:
    if out is not None:
        return out
    base = Path(spec.execution.out_dir or "runs")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = base / f"{spec.name}-{stamp}"
    suffix = 1
    while path.exists():
        path = base / f"{spec.name}-{stamp}-{suffix}"
        suffix += 1
    return path


class Progress:
    """Rich progress bars for repeats and rounds; silent when disabled."""

    def __init__(self, enabled: bool, jobs: list[Job]) -> None:
        self.enabled = enabled
        self._bar: Any = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        self._bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
        )
        self._jobs = self._bar.add_task("trainings", total=len(jobs))
        total_rounds = sum(
            (j.spec.training.rounds if j.mode in ("federated", "cyclic") else j.spec.baseline_epochs) for j in jobs
        )
        self._rounds = self._bar.add_task("rounds/epochs", total=total_rounds)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def round_done(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._rounds)

    def job_done(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._jobs)


def run_experiment(
    experiment: Experiment,
    out: Path | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Run every job of ``experiment`` and write the run directory; returns its path."""
    spec = experiment.spec
    plugins = experiment.plugins
    from fedcore.observers import observing

    # What the preflight computes once (PRV calibrations) the workers then read.
    with run_shared_results():
        engines = preflight(experiment)
        jobs = plan_jobs(experiment, engines)
        run_dir = rundir.create(timestamped_run_dir(spec, out))
        with observing(experiment), rundir.tracked(run_dir, plugins):
            _train_and_report(experiment, jobs, engines, run_dir, workers, progress)
    return run_dir


@dataclass
class ResumePlan:
    """What ``fedcore run --resume`` keeps and what it still trains."""

    finished: list[RunResult]
    """Trainings that finished before the crash (their saved results; not trained again)."""
    jobs: list[Job]
    """The trainings left, each from its last complete round (``Job.resume_round``) or from the start."""
    records: list[RoundRecord]
    """The rounds of ``rounds.jsonl`` that stand: finished trainings' and complete rounds of the others."""


def resume_experiment(run_dir: Path, workers: int | None = None, progress: bool | None = None) -> Path:
    """Continue the run in ``run_dir`` (``fedcore run --resume``): every training from its last complete round.

    Refuses (a user error) a directory that is not a fedcore run, is complete, is still
    running, or whose checkpoint parts were written by another spec or cannot be read.
    """
    from fedcore.spec import load_experiment

    check_resumable(run_dir)
    experiment = load_experiment(run_dir / "spec.resolved.yaml")
    with run_shared_results():
        engines = preflight(experiment)
        plan = plan_resume(run_dir, plan_jobs(experiment, engines), experiment.plugins)
        with rundir.tracked(run_dir, experiment.plugins):
            _train_and_report(experiment, plan.jobs, engines, run_dir, workers, progress, plan)
    return run_dir


def check_resumable(run_dir: Path) -> None:
    """Refuse a run directory ``--resume`` cannot continue (one line, exit 2)."""
    hint = "give --resume the directory of a simulated 'fedcore run' that did not complete"
    if not run_dir.is_dir() or not (run_dir / "spec.resolved.yaml").is_file():
        raise FedcoreUserError(f"{run_dir} is not a fedcore run directory (no spec.resolved.yaml)", hint=hint)
    if (run_dir / "deployment.json").is_file():
        raise FedcoreUserError(
            f"{run_dir} is a deployed study's run directory", hint="resume it with 'fedcore run SPEC --federation ... --resume DIR'"
        )
    status = rundir.read_status(run_dir)
    if status is None:
        raise FedcoreUserError(f"{run_dir} has no readable {rundir.STATUS_FILE}: not a fedcore run directory", hint=hint)
    if status.get("state") == "complete":
        raise FedcoreUserError(f"{run_dir} is complete; nothing to resume", hint="its report is in report.md")
    if status.get("state") == "running" and status.get("host") == socket.gethostname() and _alive(status.get("pid")):
        raise FedcoreUserError(
            f"{run_dir} is still running (pid {status.get('pid')})", hint="wait for it, or stop it before resuming"
        )


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def plan_resume(run_dir: Path, jobs: list[Job], plugins: PluginManager) -> ResumePlan:
    """Which trainings finished, and where each other one resumes (the last round every party's part holds)."""
    finished: list[RunResult] = []
    todo: list[Job] = []
    records: list[RoundRecord] = []
    for job in jobs:
        layout = job.layout(run_dir)
        try:
            result = load_result(layout)
            if result is not None:
                finished.append(result)
                records += result.records
                continue
            if job.mode == "centralized" or not job.spec.execution.checkpoints:
                todo.append(job)  # trained again from the start (a baseline keeps no per-epoch parts)
                continue
            sites = [site_name(s.site) for s in load_data(job.spec, job.seed, plugins).sites]
            last = last_complete_round(layout, sites)
            if last is None:
                todo.append(job)
                continue
            ledger = job.spec.ledger
            if ledger is not None and not getattr(plugins.get("ledger", ledger.use, "ledger.use"), "continues_chain", False):
                raise FedcoreUserError(
                    f"cannot resume {describe(job)}: the '{ledger.use}' ledger cannot continue an existing chain",
                    where="ledger.use",
                    hint="start a new run (resume needs a ledger such as sqlite-chain)",
                )
            state = load_coordinator(layout, last)
            if state.get("spec") != checkpoint_digest(job.spec, job.repeat):
                raise CheckpointError(
                    f"{layout.coordinator_dir / layout.file(last)} was written by another spec or repeat "
                    "(was spec.resolved.yaml edited?)"
                )
            records += [RoundRecord.model_validate_json(load_coordinator(layout, r)["record"]) for r in range(1, last + 1)]
        except CheckpointError as exc:
            raise FedcoreUserError(
                f"cannot resume {describe(job)}: {exc}", hint="restore the run directory's checkpoints, or start a new run"
            ) from None
        todo.append(dataclasses.replace(job, resume_round=last))
    for job in todo:
        if job.mode == "federated" and job.resume_round is None:
            _set_aside(run_dir, _ledger_dir(run_dir, job))
    return ResumePlan(finished, todo, records)


def describe(job: Job) -> str:
    return f"the {job.mode} training of arm '{job.arm}', repeat {job.repeat}"


def _set_aside(run_dir: Path, ledger_dir: Path) -> None:
    """A training that restarts from scratch: its earlier ledger and openings are kept beside, renamed."""
    folders = [ledger_dir, run_dir / OPENINGS_DIR / ledger_dir.name]
    folders += [site / OPENINGS_DIR / ledger_dir.name for site in sorted((run_dir / "sites").glob("*"))]
    for folder in folders:
        if folder.exists():
            index = 1
            while folder.with_name(f"{folder.name}.abandoned-{index}").exists():
                index += 1
            folder.rename(folder.with_name(f"{folder.name}.abandoned-{index}"))


def _rewrite_rounds(path: Path, kept: list[RoundRecord]) -> None:
    """``rounds.jsonl`` holding only ``kept`` (lines of rounds cut short dropped), in the order first written."""
    wanted = {(r.arm, r.mode, r.repeat, r.round): r for r in kept}
    lines: list[str] = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = RoundRecord.model_validate_json(line)
        except ValueError:  # a line cut by the crash
            continue
        key = (record.arm, record.mode, record.repeat, record.round)
        if wanted.pop(key, None) is not None:
            lines.append(line + "\n")
    lines += [r.model_dump_json() + "\n" for r in wanted.values()]
    rundir.atomic_write_text(path, "".join(lines))


def _train_and_report(
    experiment: Experiment,
    jobs: list[Job],
    engines: dict[str, EngineChoice],
    run_dir: Path,
    workers: int | None,
    progress: bool | None,
    resume: ResumePlan | None = None,
) -> None:
    """Every training of the experiment, then ``summary.json`` and the report, into ``run_dir``.

    With ``resume``, only ``jobs`` are trained; the plan's finished results join theirs in
    the summary, and ``rounds.jsonl`` keeps the plan's records before new ones are appended.
    """
    from fedcore.report import build_report, write_summary

    spec = experiment.spec
    plugins = experiment.plugins
    if resume is None:
        (run_dir / "spec.resolved.yaml").write_text(resolved_yaml(spec))
        if len(experiment.arms) > 1:
            arms_yaml = {arm.label: json.loads(arm.spec.model_dump_json()) for arm in experiment.arms}
            (run_dir / "arms.json").write_text(json.dumps(arms_yaml, indent=1))
    cost = unit_cost_model(experiment)
    if jobs and not (workers or spec.execution.workers):
        workers = default_workers(experiment, execution_units(jobs, os.cpu_count() or 1, cost))
    workers = min(workers or spec.execution.workers or 1, len(jobs))
    units = execution_units(jobs, workers, cost)
    show = spec.execution.progress if progress is None else progress
    rundir.call_observers(plugins, "fedcore_run_start", spec=spec, run_dir=run_dir, n_runs=len(jobs))
    started = time.perf_counter()
    results: list[RunResult] = []
    rounds_path = run_dir / "rounds.jsonl"
    if resume is not None:
        _rewrite_rounds(rounds_path, resume.records)
    with contextlib.ExitStack() as stack:
        # The workers start before this process starts a thread (the progress bars'):
        # forked, they inherit its imported modules.
        pool = None if workers <= 1 else stack.enter_context(_WorkerPool(units, run_dir, workers, spec.execution, cost))
        rounds_file = stack.enter_context(rounds_path.open("w" if resume is None else "a"))
        bars = stack.enter_context(Progress(show, jobs))

        def on_round(record: RoundRecord) -> None:
            rounds_file.write(record.model_dump_json() + "\n")
            rounds_file.flush()
            rundir.call_observers(plugins, "fedcore_round_end", record=record)
            bars.round_done()

        if pool is None:
            torch.set_num_threads(spec.execution.torch_threads())
            for unit in units:
                try:
                    results += execute_unit(unit, run_dir, plugins, on_round)
                except BaseException as exc:
                    rundir.tag_job(exc, _job_info(unit))
                    raise
                for _ in unit:
                    bars.job_done()
        else:
            results = pool.collect(on_round, bars)
    total = time.perf_counter() - started
    if resume is not None:
        results = [*resume.finished, *results]  # ``total`` is this session's wall time
    data_sections = load_data(experiment.arms[0].spec, spec.seed, plugins)
    summary = write_summary(run_dir, experiment, results, total, data_sections, engines)
    build_report(run_dir)
    rundir.call_observers(plugins, "fedcore_run_end", summary=summary.model_dump(), run_dir=run_dir)


def start_method(execution: ExecutionSpec) -> str:
    """How worker processes start: ``fork`` where that is safe -- Linux, the CPU, one torch
    thread a worker, no thread in this process but the main one -- else ``spawn``.

    A forked worker starts with this process's imported modules (torch, the plugins: ~3 s
    of CPU a worker, ~8 s of wall time at the paper run's start on two busy cores). A fork
    copies only the calling thread: a lock another thread held stays held in the child, and
    an OpenMP pool (torch's threads) or a CUDA context does not survive it, hence the
    conditions; with one thread, a worker never enters an OpenMP parallel region.
    """
    if (
        sys.platform.startswith("linux")
        and execution.device == "cpu"
        and execution.torch_threads() == 1
        and threading.active_count() == 1
        and "fork" in mp.get_all_start_methods()
    ):
        return "fork"
    return "spawn"


class _WorkerPool:
    """Worker processes training ``units``, each unit one task, longest first; the events
    they send (round records) come back through a manager's queue.

    Entering starts the workers and hands them every unit (:func:`start_method` says how
    they start); :meth:`collect` waits for the results; leaving stops whatever still runs.
    """

    def __init__(self, units: list[list[Job]], run_dir: Path, workers: int, execution: ExecutionSpec, cost: UnitCost) -> None:
        self._units, self._run_dir, self._workers, self._cost = units, run_dir, workers, cost
        self._threads = execution.torch_threads()
        self._context = mp.get_context(start_method(execution))
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _WorkerPool:
        with self._stack as stack:
            manager = SyncManager(ctx=self._context)
            manager.start(processes.die_with_parent, (os.getpid(),))
            stack.callback(manager.shutdown)
            self._events = manager.Queue()
            pool = ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=self._context,
                initializer=_worker_init,
                initargs=(self._events, self._threads, os.getpid(), shared_results(), self._spare_cores()),
            )
            stack.callback(pool.shutdown)
            self._pool = pool
            # Longest units first keeps both cores busy until the end.
            ordered = sorted(self._units, key=self._cost, reverse=True)
            self._futures: dict[Future[list[RunResult]], list[Job]] = {
                pool.submit(_worker_run, unit, str(self._run_dir)): unit for unit in ordered
            }
            self._stack = stack.pop_all()
        return self

    def _spare_cores(self) -> bool:
        """Whether the workers' threads leave a core of this process idle."""
        return self._workers * self._threads < processes.usable_cpus()

    def collect(self, on_round: Callable[[RoundRecord], None], bars: Progress) -> list[RunResult]:
        """Every unit's results, as they finish; ``on_round`` gets the workers' round records
        (in this thread's stead, from a thread that drains the queue)."""
        events, stop = self._events, threading.Event()

        def drain() -> None:
            while not stop.is_set() or not events.empty():
                try:
                    record = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                except (EOFError, OSError):
                    return
                on_round(record)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        results: list[RunResult] = []
        try:
            for future in as_completed(self._futures):
                try:
                    results += future.result()
                except BaseException as exc:
                    rundir.tag_job(exc, _job_info(self._futures[future]))
                    raise
                for _ in self._futures[future]:
                    bars.job_done()
        finally:
            stop.set()
            drainer.join()
        return results

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None:
            processes.stop_pool(self._pool)
        self._stack.close()


def _job_info(unit: list[Job]) -> dict[str, Any]:
    """What a failure report says about the training that failed (the repeats trained together)."""
    job = unit[0]
    if len(unit) == 1:
        return {"arm": job.arm, "repeat": job.repeat, "seed": job.seed, "mode": job.mode}
    return {"arm": job.arm, "repeat": [j.repeat for j in unit], "seed": [j.seed for j in unit], "mode": job.mode}


def _job_work(job: Job, rows: int) -> float:
    """Training rows × epochs of a job (× 2 under DP: per-sample gradients)."""
    return _row_epochs(job, rows) * (2 if _private(job) else 1)


def _private(job: Job) -> bool:
    """Whether the job trains with DP (the baselines train without the arm's privacy stages)."""
    return bool(job.spec.privacy) and job.mode == "federated"


def _row_epochs(job: Job, rows: int) -> float:
    spec = job.spec
    epochs = spec.baseline_epochs if job.mode in ("centralized", "local") else spec.training.rounds * spec.training.local_epochs
    return float(rows * epochs)
