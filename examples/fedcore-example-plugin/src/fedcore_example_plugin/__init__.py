"""An example third-party fedcore plugin: the ``fedavg-by-steps`` aggregator.

Sites that ran more local steps moved further; this aggregator averages updates
weighted by ``local_steps`` instead of sample counts. It looks at individual
updates, so it declares ``needs_individual_updates`` and fedcore refuses it
under secure aggregation when the spec loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore import hookimpl
from fedcore.components import Aggregator
from fedcore.types import ClientUpdate, Weights


class FedAvgByStepsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server_learning_rate: float = Field(1.0, gt=0)


class FedAvgBySteps(Aggregator):
    """Mean of the updates weighted by each site's number of local optimizer steps."""

    name: ClassVar[str] = "fedavg-by-steps"
    Settings: ClassVar[type[BaseModel]] = FedAvgByStepsSettings
    needs_individual_updates: ClassVar[bool] = True

    def aggregate(self, round: int, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Weights:
        steps = np.array([max(u.local_steps, 1) for u in updates], dtype=np.float64)
        share = steps / steps.sum()
        eta = self.settings.server_learning_rate  # type: ignore[attr-defined]
        out = {}
        for name, current in global_weights.arrays.items():
            mean = sum(s * u.delta[name].astype(np.float64) for s, u in zip(share, updates))
            out[name] = (current.astype(np.float64) + eta * mean).astype(current.dtype)
        return Weights(arrays=out)


@hookimpl
def fedcore_aggregators() -> list[type[Aggregator]]:
    return [FedAvgBySteps]
