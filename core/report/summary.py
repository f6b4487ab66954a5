"""``summary.json``: the typed results of a run, written once, read by the report.

The results step of the run pipeline (plan -> execute -> results -> report): the
runner hands its finished trainings to :func:`write_summary`; everything after
(:func:`fedcore.report.build_report`, ``fedcore report DIR``) reads the files only,
through :class:`Summary`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from fedcore.errors import DataError
from fedcore.metrics import convergence_epoch, mean_sd, metric_value
from fedcore.releases import SECTIONS_WITHOUT_COUNTS, protections
from fedcore.types import ClassificationMetrics, PrivacySpent, json_digest

if TYPE_CHECKING:
    from fedcore.components import FederatedData
    from fedcore.engine.runner import EngineChoice
    from fedcore.engine.simulation import RunResult
    from fedcore.spec import Experiment, ExperimentSpec

METRICS = ("accuracy", "precision", "recall", "f1")


def baseline_key(spec: ExperimentSpec) -> str:
    """Arms that share data, model and the baselines' training share their baselines."""
    return json_digest(
        [spec.data.model_dump(), spec.model.model_dump(), spec.baseline_training.model_dump(), spec.baseline.model_dump()]
    )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSummary(_Model):
    """One training (one repeat of an arm, federated or centralized): its last round's metrics."""

    repeat: int
    rounds: int
    epochs: int
    test: ClassificationMetrics
    validation: ClassificationMetrics
    convergence_epoch: int | None
    wall_seconds: float
    seconds_per_round: float
    bytes_per_update: float | None = None
    seconds_per_update: float | None = None
    updates: int | None = None
    privacy: list[PrivacySpent] = Field(default_factory=list)
    ledger: dict[str, Any] = Field(default_factory=dict)
    stopped_reason: str | None = None
    audits: list[dict[str, Any]] = Field(default_factory=list)
    """federated: each audit's result on this repeat's final model (``AuditResult`` dumps)"""


class Trainings(_Model):
    """The runs of one arm in one mode, and their mean ± sd (``aggregate``)."""

    runs: list[RunSummary]
    aggregate: dict[str, Any]
    of_arm: str | None = None
    """centralized: the arm whose baseline this is (arms with the same data, model and training share one)"""


class ArmSetup(_Model):
    """Which components an arm uses, and the engine that trained it (with why not vectorized)."""

    model: str
    aggregator: str
    privacy: list[str]
    secure_aggregation: str
    ledger: str
    attacks: list[str]
    audits: list[str] = Field(default_factory=list)
    engine: str
    engine_reason: str | None = None


class ArmSummary(_Model):
    label: str
    assignments: list[list[Any]]
    privacy_specs: list[dict[str, Any]]
    aggregator: dict[str, Any]
    setup: ArmSetup
    federated: Trainings
    centralized: Trainings | None
    local: Trainings | None = Field(None, exclude_if=lambda value: value is None)
    """each centre alone, scored on its own splits (``baseline.local``)"""
    cyclic: Trainings | None = Field(None, exclude_if=lambda value: value is None)
    """one model, centre after centre (``baseline.cyclic``)"""


class SiteSize(_Model):
    site: int
    name: str
    train: int
    validation: int
    test: int


class DataSummary(_Model):
    sites: list[SiteSize]
    features: int
    classes: list[Any]
    sections: dict[str, str]
    withheld_sections: list[str] = Field(default_factory=list)
    """data sections left out because an arm runs under DP (they hold exact per-site counts)"""
    released_statistics: list[str]


class Summary(_Model):
    """Everything ``summary.json`` holds."""

    name: str
    spec_sha256: str
    seed: int
    reproducible_noise: bool = False
    repeats: int
    rounds: int
    local_epochs: int
    total_seconds: float
    data: DataSummary
    arms: list[ArmSummary]
    metrics: list[str] = Field(default_factory=list, exclude_if=lambda value: not value)
    """``evaluation.metrics`` (empty: the default accuracy, precision, recall, F1)"""
    primary: str = Field("accuracy", exclude_if=lambda value: value == "accuracy")
    """``evaluation.primary``: the metric of convergence, the headline tables and the figure"""

    def write(self, run_dir: Path) -> None:
        # json.dumps keeps NaN (a run refused before its first round) as NaN, which reads back.
        (run_dir / "summary.json").write_text(json.dumps(self.model_dump(mode="python"), indent=1, default=_json_default))

    @classmethod
    def read(cls, path: Path) -> Summary:
        return cls.model_validate(json.loads(path.read_text()))


def run_spec(target: Path) -> tuple[Path, dict[str, Any]] | None:
    """``spec.resolved.yaml`` of the run directory holding ``target`` (itself or a parent), read; or None."""
    import yaml

    for candidate in (target, *target.parents):
        spec_file = candidate / "spec.resolved.yaml"
        if spec_file.is_file():
            try:
                spec = yaml.safe_load(spec_file.read_text()) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                spec = None
            if not isinstance(spec, dict):
                raise DataError("unreadable spec.resolved.yaml", where=str(spec_file), hint="pass --keys public-keys.json")
            return spec_file, spec
    return None


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _run_summary(result: RunResult, primary: str = "accuracy") -> dict[str, Any]:
    records = result.records
    if not records:  # refused before its first round
        nan = float("nan")
        empty = {m: nan for m in ("loss", "accuracy", "precision", "recall", "f1")} | {"n": 0}
        return {
            "repeat": result.repeat, "rounds": 0, "epochs": 0, "test": empty, "validation": empty,
            "convergence_epoch": None, "wall_seconds": result.wall_seconds, "seconds_per_round": nan,
            "privacy": [], "ledger": result.ledger, "stopped_reason": result.stopped_reason,
        }
    last = records[-1]
    conv = convergence_epoch([r.epoch for r in records], [metric_value(r.validation, primary) for r in records])
    out: dict[str, Any] = {
        "repeat": result.repeat,
        "rounds": len(records),
        "epochs": last.epoch,
        "test": last.test.model_dump(),
        "validation": last.validation.model_dump(),
        "convergence_epoch": conv,
        "wall_seconds": result.wall_seconds,
        "seconds_per_round": sum(r.round_seconds for r in records) / len(records),
    }
    if result.mode == "federated":
        sizes = [b for r in records for b in r.update_bytes]
        secs = [s for r in records for s in r.update_seconds]
        out["bytes_per_update"] = sum(sizes) / len(sizes) if sizes else 0
        out["seconds_per_update"] = sum(secs) / len(secs) if secs else 0
        out["updates"] = len(sizes)
        out["privacy"] = [p.model_dump() for p in last.privacy]
        out["ledger"] = result.ledger
        out["stopped_reason"] = result.stopped_reason
        out["audits"] = result.audits
    return out


def _aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for metric in METRICS:
        mean, sd = mean_sd([r["test"][metric] for r in runs])
        agg[metric] = {"mean": mean, "sd": sd}
    # evaluation.metrics: undefined values (None) are left out; none defined -> NaN ("undefined")
    for metric in dict.fromkeys(k for r in runs for k in r["test"].get("scores", {})):
        mean, sd = mean_sd([r["test"]["scores"].get(metric) for r in runs])
        agg[f"scores.{metric}"] = {"mean": mean, "sd": sd, "n": sum(r["test"]["scores"].get(metric) is not None for r in runs)}
    conv = [r["convergence_epoch"] for r in runs if r["convergence_epoch"] is not None]
    mean, sd = mean_sd(conv)
    agg["convergence_epoch"] = {"mean": mean, "sd": sd}
    mean, sd = mean_sd([r["wall_seconds"] for r in runs])
    agg["wall_seconds"] = {"mean": mean, "sd": sd}
    if runs and "bytes_per_update" in runs[0]:
        agg["bytes_per_update"] = {"mean": mean_sd([r["bytes_per_update"] for r in runs])[0], "sd": 0.0}
        eps = [p["epsilon"] for r in runs for p in r.get("privacy", [])]
        agg["epsilon_max"] = max(eps) if eps else None
    return agg


def write_summary(
    run_dir: Path,
    experiment: Experiment,
    results: Sequence[RunResult],
    total_seconds: float,
    data: FederatedData,
    engines: dict[str, EngineChoice],
) -> Summary:
    """Write ``summary.json`` from the finished trainings and return it.

    :param engines: per arm label, the engine that trained it and why.
    """
    primary = experiment.spec.evaluation.primary
    by_arm: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for result in results:
        by_arm[(result.mode, result.arm)].append(result)
    first_label_by_key: dict[str, str] = {}
    arms = []
    for arm in experiment.arms:
        key = baseline_key(arm.spec)
        first_label_by_key.setdefault(key, arm.label)
        fed_runs = [_run_summary(r, primary) for r in sorted(by_arm[("federated", arm.label)], key=lambda r: r.repeat)]
        baselines = {
            mode: [_run_summary(r, primary) for r in sorted(by_arm.get((mode, first_label_by_key[key]), []), key=lambda r: r.repeat)]
            for mode in ("centralized", "local", "cyclic")
        }
        cen_runs = baselines.pop("centralized")
        arms.append(
            {
                "label": arm.label,
                "assignments": [[p, v] for p, v in arm.assignments],
                "privacy_specs": [p.model_dump() for p in arm.spec.privacy],
                "aggregator": arm.spec.aggregator.model_dump(),
                "setup": {
                    "model": arm.spec.model.use,
                    "aggregator": arm.spec.aggregator.use,
                    "privacy": [p.use for p in arm.spec.privacy] or ["none"],
                    "secure_aggregation": arm.spec.secure_aggregation.use if arm.spec.secure_aggregation else "none",
                    "ledger": arm.spec.ledger.use if arm.spec.ledger else "none",
                    "attacks": [a.use for a in arm.spec.attacks] or ["none"],
                    "audits": [a.use for a in arm.spec.audits],
                    "engine": engines[arm.label].engine,
                    "engine_reason": engines[arm.label].reason,
                },
                "federated": {"runs": fed_runs, "aggregate": _aggregate(fed_runs)},
                "centralized": {"runs": cen_runs, "aggregate": _aggregate(cen_runs), "of_arm": first_label_by_key[key]}
                if cen_runs
                else None,
                **{
                    mode: {"runs": runs, "aggregate": _aggregate(runs), "of_arm": first_label_by_key[key]}
                    for mode, runs in baselines.items()
                    if runs
                },
            }
        )
    spec = experiment.spec
    # Under DP no file of the run keeps the data sections with exact per-site counts.
    private = frozenset().union(*(protections([p.model_dump() for p in arm.spec.privacy]) for arm in experiment.arms)) != {"none"}
    withheld = [t for t in data.report_sections if private and t not in SECTIONS_WITHOUT_COUNTS]
    summary = {
        "name": spec.name,
        "spec_sha256": json_digest(spec.model_dump(mode="json")),
        "seed": spec.seed,
        "reproducible_noise": spec.execution.reproducible_noise,
        "repeats": spec.repeats,
        "rounds": spec.training.rounds,
        "local_epochs": spec.training.local_epochs,
        "total_seconds": total_seconds,
        "data": {
            "sites": [
                {"site": s.site, "name": s.name, "train": s.n_train, "validation": len(s.y_val), "test": len(s.y_test)}
                for s in data.sites
            ],
            "features": data.n_features,
            "classes": data.class_names,
            "sections": {t: b for t, b in data.report_sections.items() if t not in withheld},
            "withheld_sections": withheld,
            "released_statistics": sorted(data.released_statistics),
        },
        "arms": arms,
        "metrics": list(spec.evaluation.metrics),
        "primary": primary,
    }
    typed = Summary.model_validate(summary)
    typed.write(run_dir)
    return typed
