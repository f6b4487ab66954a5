"""Reference aggregators."""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Aggregator
from fedcore.plugins.aggregators.fedavg import FedAvg


@hookimpl
def fedcore_aggregators() -> list[type[Aggregator]]:
    return [FedAvg]
