"""FedAvgM (Hsu et al. 2019): FedAvg with momentum on the server."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator
from fedcore.plugins.aggregators.base import apply_step, arrays_from_state, arrays_to_state, is_float, mean_deltas
from fedcore.types import SecureSum, Weights


class FedAvgMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server_learning_rate: float = Field(1.0, gt=0, description="eta: step size applied to the velocity")
    momentum: float = Field(0.9, ge=0, lt=1, description="beta: server momentum (0 is FedAvg)")


class FedAvgM(Aggregator[FedAvgMSettings]):
    """``v <- beta * v + mean_delta``; new global = global + eta * v (mean weighted by samples).

    Hsu et al. write it with the pseudo-gradient ``-mean_delta``; the sign is folded in.
    Only the weighted sum is needed, so it runs under secure aggregation. Integer
    buffers take the plain mean step (momentum on a counter means nothing).
    """

    name: ClassVar[str] = "fedavgm"
    Settings: ClassVar[type[BaseModel]] = FedAvgMSettings
    description: ClassVar[str] = "FedAvg with server momentum (Hsu et al. 2019)"

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self._velocity: dict[str, np.ndarray] = {}

    def aggregate_sum(self, round: int, global_weights: Weights, summed: SecureSum) -> Weights:
        s = self.settings
        step: dict[str, np.ndarray] = {}
        velocity: dict[str, np.ndarray] = {}
        means = mean_deltas(summed)
        for name, current in global_weights.arrays.items():
            mean = means[name]
            if not is_float(current):
                step[name] = mean
                continue
            previous = self._velocity.get(name, np.zeros_like(mean))
            velocity[name] = s.momentum * previous + mean
            step[name] = s.server_learning_rate * velocity[name]
        self._velocity = velocity
        return apply_step(global_weights, step)

    def state_dict(self) -> dict[str, Any]:
        return arrays_to_state("velocity", self._velocity)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._velocity = arrays_from_state("velocity", state)
