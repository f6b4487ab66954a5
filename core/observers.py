"""A spec's ``observers`` (:class:`fedcore.components.Observer`) attached to a run.

Each observer component is registered on the run's plugin manager as a lifecycle plugin
for the run's duration, so it is called exactly like an installed plugin's
``fedcore_run_start`` ... ``fedcore_run_failed`` hooks (and, like them, an observer that
raises is logged by name and skipped: :func:`fedcore.rundir.call_observers`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedcore.components import Observer
from fedcore.hookspecs import hookimpl
from fedcore.spec import Experiment, instantiate


class _Lifecycle:
    """One spec observer as a pluggy plugin implementing the lifecycle hooks."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    @hookimpl
    def fedcore_run_start(self, spec: Any, run_dir: Path, n_runs: int) -> None:
        self.observer.run_start(spec, run_dir, n_runs)

    @hookimpl
    def fedcore_round_end(self, record: Any) -> None:
        self.observer.round_end(record)

    @hookimpl
    def fedcore_run_end(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.observer.run_end(summary, run_dir)

    @hookimpl
    def fedcore_run_failed(self, run_dir: Path, status: dict[str, Any]) -> None:
        self.observer.run_failed(run_dir, status)


@contextmanager
def observing(experiment: Experiment) -> Iterator[list[Observer]]:
    """The spec's observers, built once and attached to ``experiment.plugins`` while the block runs."""
    observers = [instantiate(ref, "observer", experiment.plugins) for ref in experiment.spec.observers]
    registered = []
    try:
        for index, observer in enumerate(observers):
            plugin = _Lifecycle(observer)  # type: ignore[arg-type]
            experiment.plugins.register_observer(plugin, f"observers[{index}]:{observer.name}")
            registered.append(plugin)
        yield observers  # type: ignore[misc]
    finally:
        for plugin in registered:
            experiment.plugins.unregister_observer(plugin)
