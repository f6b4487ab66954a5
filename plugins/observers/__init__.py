"""Reference observers: a CSV log of every round, and MLflow experiment tracking (``fedcore[mlflow]``)."""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Observer
from fedcore.plugins.observers.csv_log import CsvObserver
from fedcore.plugins.observers.mlflow_tracking import MlflowObserver


@hookimpl
def fedcore_observers() -> list[type[Observer]]:
    return [CsvObserver, MlflowObserver]
