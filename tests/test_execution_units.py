"""How a run's trainings are grouped into worker processes (fedcore.engine.runner.execution_units)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.engine import runner
from fedcore.spec import load_experiment

PAPER = Path(__file__).resolve().parents[1] / "specs" / "paper.yaml"


@pytest.fixture(params=["compiled", "native"])
def step_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cost model of either way of running a step (TorchScript, or the native MLP step)."""
    monkeypatch.setattr(runner, "_step_kind", lambda *args: request.param)
    return str(request.param)


def units_of(overrides: list[str], workers: int) -> list[tuple[str, int]]:
    experiment = load_experiment(PAPER, ["data.settings.patients_per_site=200", *overrides])
    jobs = runner.plan_jobs(experiment, runner.preflight(experiment))
    units = runner.execution_units(jobs, workers, runner.unit_cost_model(experiment))
    trained = sorted(job.key for unit in units for job in unit)
    assert trained == sorted(job.key for job in jobs)  # every training once
    return sorted((unit[0].mode, len(unit)) for unit in units)


def test_two_stacked_groups_on_two_cores(step_kind: str) -> None:
    if step_kind == "compiled":
        # Splitting would make each half pay the per-step overhead the whole group pays once.
        assert units_of([], 2) == [("centralized", 10), ("federated", 10)]
    else:
        # Little overhead a step: the DP group alone would outlast the centralized one, so
        # each core trains half of each.
        assert units_of([], 2) == [("centralized", 5), ("centralized", 5), ("federated", 5), ("federated", 5)]


def test_a_lone_group_is_split_to_fill_the_cores(step_kind: str) -> None:
    assert units_of(["baseline.centralized=false"], 2) == [("federated", 5), ("federated", 5)]


def test_more_cores_split_further(step_kind: str) -> None:
    units = units_of([], 4)
    if step_kind == "compiled":
        assert units == [("centralized", 5), ("centralized", 5), ("federated", 5), ("federated", 5)]
    else:
        assert units == [("centralized", 2), ("centralized", 2), ("centralized", 3), ("centralized", 3)] + [
            ("federated", 2), ("federated", 2), ("federated", 3), ("federated", 3)
        ]


def test_the_cost_model_knows_when_the_native_step_runs() -> None:
    from fedcore.engine.native import unavailable_reason

    experiment = load_experiment(PAPER, ["data.settings.patients_per_site=200"])
    data = runner.load_data(experiment.spec, experiment.spec.seed, experiment.plugins)
    expected = "native" if unavailable_reason() is None else "compiled"
    assert runner._step_kind(experiment.spec, experiment.plugins, data) == expected


def test_one_worker_never_splits(step_kind: str) -> None:
    assert units_of(["baseline.centralized=false"], 1) == [("federated", 10)]


@pytest.mark.parametrize(
    ("costs", "workers", "expected"), [([5.0, 4.0, 3.0], 2, 7.0), ([5.0, 4.0, 3.0], 1, 12.0), ([1.0], 3, 1.0)]
)
def test_makespan_places_the_longest_units_first(costs: list[float], workers: int, expected: float) -> None:
    units = [[cost] for cost in costs]
    assert runner.makespan(units, workers, lambda unit: unit[0]) == expected  # type: ignore[arg-type, return-value]


def test_workers_are_forked_only_where_that_is_safe() -> None:
    """A forked worker starts with the run's imported modules; it is only forked on Linux, on
    the CPU, with one torch thread a worker and no other thread in the process (a lock held
    by another thread would stay held in the child)."""
    import sys
    import threading

    from fedcore.spec import ExecutionSpec

    alone = threading.active_count() == 1
    expected = "fork" if sys.platform.startswith("linux") and alone else "spawn"
    assert runner.start_method(ExecutionSpec()) == expected
    assert runner.start_method(ExecutionSpec(device="cuda")) == "spawn"
    assert runner.start_method(ExecutionSpec(threads_per_worker=2)) == "spawn"
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert runner.start_method(ExecutionSpec()) == "spawn"
    finally:
        stop.set()
        other.join()
