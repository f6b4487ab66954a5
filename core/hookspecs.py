"""Every hook of fedcore: the plugin API.

A plugin is a module (or object) registered under the entry-point group
``fedcore`` that implements some of these hooks with ``@fedcore.hookimpl``.
Registration hooks return lists of component classes; lifecycle hooks let
observers (progress, experiment trackers) watch a run without changing it.
Implementations may accept a subset of a hook's arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from fedcore.components import KINDS

if TYPE_CHECKING:
    from fedcore.components import (
        Aggregator,
        Attack,
        Audit,
        Observer,
        Dataset,
        Ledger,
        Model,
        PrivacyMechanism,
        SecureAggregator,
    )
    from fedcore.spec import ExperimentSpec
    from fedcore.types import RoundRecord

PROJECT = "fedcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fedcore_datasets() -> list[type[Dataset]]:
    """Return the dataset component classes this plugin provides.

    Each class subclasses :class:`fedcore.components.Dataset`; its ``name`` is the
    value of ``data.use`` in a spec.
    """


@hookspec
def fedcore_models() -> list[type[Model]]:
    """Return the model component classes this plugin provides (``model.use``)."""


@hookspec
def fedcore_aggregators() -> list[type[Aggregator]]:
    """Return the aggregator component classes this plugin provides (``aggregator.use``)."""


@hookspec
def fedcore_privacy_mechanisms() -> list[type[PrivacyMechanism]]:
    """Return the privacy mechanism classes this plugin provides (entries of ``privacy``)."""


@hookspec
def fedcore_secure_aggregators() -> list[type[SecureAggregator]]:
    """Return the secure aggregation classes this plugin provides (``secure_aggregation.use``)."""


@hookspec
def fedcore_ledgers() -> list[type[Ledger]]:
    """Return the ledger classes this plugin provides (``ledger.use``)."""


@hookspec
def fedcore_attacks() -> list[type[Attack]]:
    """Return the simulated attack classes this plugin provides (entries of ``attacks``)."""


@hookspec
def fedcore_audits() -> list[type[Audit]]:
    """Return the audit classes this plugin provides (entries of ``audits``).

    Each class subclasses :class:`fedcore.components.Audit`; it runs after training
    on the final model of every (arm, repeat), reads a site's rows only inside that
    site, and returns a :class:`fedcore.components.AuditResult` the report renders.
    """


@hookspec
def fedcore_observers() -> list[type[Observer]]:
    """Return the observer classes this plugin provides (entries of ``observers``).

    Each class subclasses :class:`fedcore.components.Observer`: it watches a run from the
    main process (``run_start``, ``round_end``, ``run_end``, ``run_failed``) and never
    changes it.
    """


@hookspec
def fedcore_run_start(spec: ExperimentSpec, run_dir: Path, n_runs: int) -> None:
    """Called once before the first round of an experiment (all arms and repeats).

    :param spec: the resolved experiment spec, every default filled in.
    :param run_dir: the directory the run writes its outputs to.
    :param n_runs: how many (arm, repeat) trainings the experiment will execute.
    """


@hookspec
def fedcore_round_end(record: RoundRecord) -> None:
    """Called after every evaluated round (federated) or epoch (centralized baseline).

    :param record: the round's metrics, timings, communication and privacy spent.
    """


@hookspec
def fedcore_run_end(summary: dict[str, Any], run_dir: Path) -> None:
    """Called once when the experiment has finished and its report is written.

    :param summary: the content of ``summary.json``.
    :param run_dir: the directory holding the report, metrics and ledger.
    """


@hookspec
def fedcore_run_failed(run_dir: Path, status: dict[str, Any]) -> None:
    """Called once when an experiment stops early: an error, Ctrl-C or SIGTERM.

    ``fedcore_run_end`` is not called then. An observer that raises in any lifecycle
    hook is logged by name and skipped; the run goes on.

    :param run_dir: the run directory (its ``status.json`` and ``rounds.jsonl`` hold what was done).
    :param status: the content of ``status.json``: ``state`` (``failed`` or ``interrupted``),
        ``error``, ``error_kind`` and, when known, ``job`` (arm, repeat, seed, mode).
    """


#: registration hook name -> the component kind it returns (a view of :data:`fedcore.components.KINDS`)
REGISTRATION_HOOKS: dict[str, str] = {kind.hook: kind.name for kind in KINDS}
