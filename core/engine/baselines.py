"""The local-only and cyclic baselines of an FL comparison, on the sequential engine.

Both use the federated arms' splits, initial model (``initial_module``) and site seeds
(``derive_seed(seed, 1, site)``), and train through :class:`~fedcore.engine.site.SiteRuntime`
with no stages (no aggregator's or privacy mechanism's: they are non-private references,
like the centralized baseline), with ``baseline.training`` where the spec sets it
(:meth:`fedcore.spec.ExperimentSpec.as_baseline`, applied when the jobs are planned).

- ``local``: every centre trains its own copy alone for ``baseline_epochs`` epochs (one
  optimizer kept across them, as the centralized baseline) and is scored on its own
  splits; pooled metrics pool the centres' confusion matrices (each centre's own model).
- ``cyclic``: one model visits the centres in order, ``local_epochs`` at each (a fresh
  optimizer per visit, as a federated round), every round; scored at every centre.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from fedcore.components import RoundContext
from fedcore.engine.simulation import RoundCallback, RunJob, RunResult, append_record, derive_seed, initial_module, pooled
from fedcore.engine.site import SiteRuntime, evaluate_split_pair
from fedcore.engine.training import load_weights, weights_of
from fedcore.spec import ExperimentSpec
from fedcore.types import SiteEvaluation, Weights

#: the baselines of this module (the centralized one is ``simulation.run_centralized``)
MODES = ("local", "cyclic")


def baseline_sites(spec: ExperimentSpec, job: RunJob) -> tuple[list[SiteRuntime], Weights]:
    """Every centre of ``job`` with the federated run's initial model and site seeds, and no stages."""
    data, seed = job.data, job.seed
    initial = weights_of(initial_module(job.components, data, seed))
    sites = [
        SiteRuntime(
            site_data,
            job.components.model.build(data.n_features, data.n_classes),
            spec.training,
            [],
            data.n_classes,
            derive_seed(seed, 1, site_data.site),
            spec.evaluation.metrics,
        )
        for site_data in data.sites
    ]
    for site in sites:
        load_weights(site.module, initial)
    return sites, initial


def _record(
    spec: ExperimentSpec,
    result: RunResult,
    round_: int,
    epoch: int,
    evaluations: Sequence[SiteEvaluation],
    train_loss: float,
    seconds: float,
    on_round: RoundCallback | None,
) -> None:
    metrics = spec.evaluation.metrics
    append_record(
        result,
        on_round,
        round=round_,
        epoch=epoch,
        validation=pooled(evaluations, "validation", metrics),
        test=pooled(evaluations, "test", metrics),
        per_site=[e.without_histograms() for e in evaluations],
        train_loss=train_loss,
        round_seconds=seconds,
    )


def run_local(spec: ExperimentSpec, job: RunJob, arm: str, on_round: RoundCallback | None = None) -> RunResult:
    """Each centre trains alone; after every epoch each is scored on its own splits."""
    start = time.perf_counter()
    sites, initial = baseline_sites(spec, job)
    result = RunResult(arm=arm, repeat=job.repeat, mode="local")
    for epoch in range(1, spec.baseline_epochs + 1):
        epoch_start = time.perf_counter()
        losses = []
        for site in sites:
            ctx = RoundContext(site.site, epoch, initial, site.generator)
            losses.append(site.trainer.run(ctx, site.x_train, site.y_train, epochs=1, keep_optimizer=True).mean_loss)
        evaluations = [evaluate_split_pair(s.module, s.data, s.n_classes, spec.evaluation.metrics) for s in sites]
        _record(spec, result, epoch, epoch, evaluations, sum(losses) / len(losses), time.perf_counter() - epoch_start, on_round)
    result.wall_seconds = time.perf_counter() - start
    return result


def run_cyclic(spec: ExperimentSpec, job: RunJob, arm: str, on_round: RoundCallback | None = None) -> RunResult:
    """One model, centre after centre (``local_epochs`` each), every round; scored at every centre."""
    start = time.perf_counter()
    sites, weights = baseline_sites(spec, job)
    result = RunResult(arm=arm, repeat=job.repeat, mode="cyclic")
    for round_ in range(1, spec.training.rounds + 1):
        round_start = time.perf_counter()
        losses = []
        for site in sites:
            update = site.fit(weights, round_)
            weights = weights + update.delta
            losses.append(update.train_loss)
        evaluations = [site.evaluate(weights) for site in sites]
        epoch = round_ * spec.training.local_epochs
        _record(spec, result, round_, epoch, evaluations, sum(losses) / len(losses), time.perf_counter() - round_start, on_round)
    result.wall_seconds = time.perf_counter() - start
    result.final_weights = weights
    return result
