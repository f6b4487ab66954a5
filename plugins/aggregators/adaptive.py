"""Adaptive server optimizers of Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2).

With ``delta_t`` the sample-weighted mean of the sites' updates (a pseudo-gradient
pointing downhill):

    m_t = beta1 * m_{t-1} + (1 - beta1) * delta_t
    v_t = v_{t-1} + delta_t**2                                          (FedAdagrad)
    v_t = v_{t-1} - (1 - beta2) * delta_t**2 * sign(v_{t-1} - delta_t**2)  (FedYogi)
    v_t = beta2 * v_{t-1} + (1 - beta2) * delta_t**2                     (FedAdam)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau**2`` as in the paper (no bias correction).
They need only the weighted sum, so they run under secure aggregation. Integer
buffers take the plain mean step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator
from fedcore.plugins.aggregators.base import apply_step, arrays_from_state, arrays_to_state, is_float, mean_deltas
from fedcore.types import SecureSum, Weights


class FedAdagradSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server_learning_rate: float = Field(0.01, gt=0, description="eta")
    tau: float = Field(1e-3, gt=0, description="adaptivity: larger tau, closer to FedAvg with momentum")
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay")


class FedAdamSettings(FedAdagradSettings):
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay")


class ServerAdaptiveOptimizer(Aggregator):
    """Common part of FedAdagrad, FedYogi and FedAdam; subclasses give the second-moment rule."""

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    def second_moment(self, previous: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """``v_t`` from ``v_{t-1}`` and ``delta_t**2``."""
        raise NotImplementedError

    def aggregate_sum(self, round: int, global_weights: Weights, summed: SecureSum) -> Weights:
        s: FedAdagradSettings = self.settings  # type: ignore[assignment]
        step: dict[str, np.ndarray] = {}
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        means = mean_deltas(summed)
        for name, current in global_weights.arrays.items():
            delta = means[name]
            if not is_float(current):
                step[name] = delta
                continue
            m[name] = s.beta1 * self._m.get(name, np.zeros_like(delta)) + (1 - s.beta1) * delta
            v[name] = self.second_moment(self._v.get(name, np.full_like(delta, s.tau**2)), delta**2)
            step[name] = s.server_learning_rate * m[name] / (np.sqrt(v[name]) + s.tau)
        self._m, self._v = m, v
        return apply_step(global_weights, step)

    def state_dict(self) -> dict[str, Any]:
        return {**arrays_to_state("m", self._m), **arrays_to_state("v", self._v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._m = arrays_from_state("m", state)
        self._v = arrays_from_state("v", state)


class FedAdagrad(ServerAdaptiveOptimizer):
    """Adagrad on the server: ``v_t = v_{t-1} + delta_t**2`` (Reddi et al. 2021)."""

    name: ClassVar[str] = "fedadagrad"
    Settings: ClassVar[type[BaseModel]] = FedAdagradSettings
    description: ClassVar[str] = "server-side Adagrad (Reddi et al. 2021)"

    def second_moment(self, previous: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return previous + squared


class FedYogi(ServerAdaptiveOptimizer):
    """Yogi on the server: ``v_t = v_{t-1} - (1 - beta2) delta_t**2 sign(v_{t-1} - delta_t**2)``."""

    name: ClassVar[str] = "fedyogi"
    Settings: ClassVar[type[BaseModel]] = FedAdamSettings
    description: ClassVar[str] = "server-side Yogi (Reddi et al. 2021)"

    def second_moment(self, previous: np.ndarray, squared: np.ndarray) -> np.ndarray:
        beta2 = self.settings.beta2  # type: ignore[attr-defined]
        return previous - (1 - beta2) * squared * np.sign(previous - squared)


class FedAdam(ServerAdaptiveOptimizer):
    """Adam on the server: ``v_t = beta2 v_{t-1} + (1 - beta2) delta_t**2`` (Reddi et al. 2021)."""

    name: ClassVar[str] = "fedadam"
    Settings: ClassVar[type[BaseModel]] = FedAdamSettings
    description: ClassVar[str] = "server-side Adam (Reddi et al. 2021)"

    def second_moment(self, previous: np.ndarray, squared: np.ndarray) -> np.ndarray:
        beta2 = self.settings.beta2  # type: ignore[attr-defined]
        return beta2 * previous + (1 - beta2) * squared
