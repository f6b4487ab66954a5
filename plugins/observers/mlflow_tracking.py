"""``mlflow``: one MLflow run per (arm, repeat, mode) under one experiment (``pip install fedcore[mlflow]``).

Logs the resolved spec as params (dotted paths), every round's metrics (step: the round),
the privacy spent, and at the end ``report.md``, ``summary.json`` and the figures as
artifacts of every run. The default tracking store is a local SQLite file (``mlflow.db``
where ``fedcore run`` starts; artifacts in ``mlruns/`` beside it); no server is needed. Browse with
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` or read the runs back with
``mlflow.tracking.MlflowClient``.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Observer
from fedcore.types import ClassificationMetrics, RoundRecord

#: MLflow's limits: params per batch call, characters of a param value
_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000


class MlflowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field(
        "mlflow.db", description="an MLflow tracking URI, or a path: a local SQLite store (relative: where fedcore runs)"
    )
    experiment: str | None = Field(None, description="the MLflow experiment's name (default: the spec's name)")


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as ``{dotted.path: text}`` (lists by index)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: str(value)[:_MAX_PARAM_VALUE]}
    out: dict[str, str] = {}
    for key, item in items:
        out |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    if not out and prefix:
        out[prefix] = "[]" if isinstance(value, list) else "{}"
    return out


def split_metrics(prefix: str, metrics: ClassificationMetrics) -> dict[str, float]:
    """A split's metrics as MLflow metric values (undefined ones left out)."""
    values: dict[str, float | None] = {m: getattr(metrics, m) for m in ("loss", "accuracy", "precision", "recall", "f1")}
    values |= metrics.scores
    return {f"{prefix}_{k}": float(v) for k, v in values.items() if v is not None and not math.isnan(v)}


class MlflowObserver(Observer[MlflowSettings]):
    """Experiment tracking with MLflow: params, per-round metrics, privacy spent, report and figures."""

    name = "mlflow"
    Settings = MlflowSettings
    description = "MLflow tracking: one run per (arm, repeat), local file store by default"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("mlflow") is None:
            return "MLflow is not installed (pip install 'fedcore[mlflow]')"
        return None

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self._client: Any = None
        self._experiment_id = ""
        self._params: dict[str, str] = {}
        self._runs: dict[tuple[str, int, str], str] = {}

    def run_start(self, spec: Any, run_dir: Path, n_runs: int) -> None:
        from mlflow.tracking import MlflowClient

        uri, artifacts = self.settings.tracking_uri, None
        if ":" not in uri:  # a path: a local SQLite store (MLflow's file store is in maintenance mode)
            path = Path(uri).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{path}", (path.parent / "mlruns").as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        name = self.settings.experiment or spec.name
        found = self._client.get_experiment_by_name(name)
        self._experiment_id = (
            found.experiment_id if found is not None else self._client.create_experiment(name, artifact_location=artifacts)
        )
        self._params = flatten(spec.model_dump(mode="json"))
        self._run_dir = str(run_dir)

    def _run_id(self, record: RoundRecord) -> str:
        from mlflow.entities import Param

        key = (record.arm, record.repeat, record.mode)
        if key not in self._runs:
            suffix = "" if record.mode == "federated" else f" [{record.mode}]"
            run = self._client.create_run(
                self._experiment_id,
                run_name=f"{record.arm} r{record.repeat}{suffix}",
                tags={"fedcore.arm": record.arm, "fedcore.repeat": str(record.repeat), "fedcore.mode": record.mode,
                      "fedcore.run_dir": self._run_dir},
            )
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in self._params.items()]
            for start in range(0, len(params), _PARAMS_PER_BATCH):
                self._client.log_batch(run_id, params=params[start : start + _PARAMS_PER_BATCH])
            self._runs[key] = run_id
        return self._runs[key]

    def round_end(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        values = split_metrics("validation", record.validation) | split_metrics("test", record.test)
        if not math.isnan(record.train_loss):
            values["train_loss"] = record.train_loss
        values |= {f"epsilon_{p.mechanism}": p.epsilon for p in record.privacy}
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record.round) for k, v in values.items()]
        self._client.log_batch(self._run_id(record), metrics=metrics)

    def run_end(self, summary: dict[str, Any], run_dir: Path) -> None:
        for run_id in self._runs.values():
            for name in ("report.md", "summary.json", "spec.resolved.yaml"):
                if (run_dir / name).is_file():
                    self._client.log_artifact(run_id, str(run_dir / name))
            if (run_dir / "figures").is_dir():
                self._client.log_artifacts(run_id, str(run_dir / "figures"), "figures")
            self._client.set_terminated(run_id, "FINISHED")

    def run_failed(self, run_dir: Path, status: dict[str, Any]) -> None:
        for run_id in self._runs.values():
            self._client.set_terminated(run_id, "FAILED")
