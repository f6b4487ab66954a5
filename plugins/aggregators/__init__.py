"""Reference aggregators."""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Aggregator
from fedcore.plugins.aggregators.adaptive import FedAdagrad, FedAdam, FedYogi
from fedcore.plugins.aggregators.fedavg import FedAvg
from fedcore.plugins.aggregators.fedavgm import FedAvgM
from fedcore.plugins.aggregators.fedprox import FedProx
from fedcore.plugins.aggregators.robust import Krum, Median, MultiKrum, TrimmedMean
from fedcore.plugins.aggregators.scaffold import Scaffold


@hookimpl
def fedcore_aggregators() -> list[type[Aggregator]]:
    return [FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, Scaffold, Median, TrimmedMean, Krum, MultiKrum]
