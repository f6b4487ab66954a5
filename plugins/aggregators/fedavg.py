"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the sites' updates."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator
from fedcore.plugins.aggregators.base import mean_deltas
from fedcore.types import SecureSum, Weights


class FedAvgSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server_learning_rate: float = Field(1.0, gt=0, description="1.0 is plain FedAvg")


class FedAvg(Aggregator):
    """New global = global + eta * sum_i(n_i * delta_i) / sum_i(n_i), exact in float64."""

    name: ClassVar[str] = "fedavg"
    Settings: ClassVar[type[BaseModel]] = FedAvgSettings
    description: ClassVar[str] = "sample-weighted mean of updates"

    def aggregate_sum(self, round: int, global_weights: Weights, summed: SecureSum) -> Weights:
        eta = self.settings.server_learning_rate  # type: ignore[attr-defined]
        out = {}
        means = mean_deltas(summed)
        for name, current in global_weights.arrays.items():
            out[name] = (current.astype(np.float64) + eta * means[name]).astype(current.dtype)
        return Weights(arrays=out)
