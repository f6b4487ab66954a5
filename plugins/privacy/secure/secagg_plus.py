"""``secagg-plus``: Flower's SecAgg+ in a deployment; the coordinator learns only the weighted sum.

fedcore does not implement the protocol: the coordinator runs Flower's
``SecAggPlusWorkflow`` over the SuperLink and every site's ClientApp answers
through Flower's ``secaggplus_mod`` (key agreement, Shamir shares of mask seeds,
masked quantized updates, unmasking that survives dropouts above the
reconstruction threshold). Each site masks ``n_i * delta_i`` (its update after its
own DP stages, weighted by its sample count) and the coordinator recovers only
the weighted mean, hence ``sum_i n_i * delta_i``; it never sees one site's update.

Limits, refused with the reason: only aggregators that need just the weighted
sum; no extra tensors (SCAFFOLD's control variates, adaptive central-DP bits);
deployment only (a simulation uses ``crypten``). Values are clipped to
``[-clipping_range, clipping_range]`` and quantized to ``quantization_range``
levels, so the sum is exact to about ``2 * clipping_range / quantization_range``
per coordinate and site.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator, SecureAggregator
from fedcore.errors import PluginError, SpecError
from fedcore.types import ClientUpdate, SecureSum, Weights

if TYPE_CHECKING:
    from fedcore.spec import Components, ExperimentSpec


class SecAggPlusSettings(BaseModel):
    """Settings of ``secagg-plus`` (Flower's ``SecAggPlusWorkflow`` parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_shares: float = Field(1.0, gt=0, description="shares per mask seed: a fraction of the sites (<= 1) or a count")
    reconstruction_threshold: float = Field(
        0.67, gt=0, description="shares needed to unmask: a fraction of num_shares (<= 1) or a count"
    )
    max_weight: float | None = Field(
        None, gt=0, description="largest update weight (site sample count); default: the largest site's, as reported"
    )
    clipping_range: float = Field(8.0, gt=0, description="update values are clipped to +- this before quantization")
    quantization_range: int = Field(4194304, ge=2, description="quantization levels over the clipping range")
    timeout_s: float = Field(600.0, gt=0, description="each protocol stage waits at most this long for the sites")


class SecAggPlusSecureAggregator(SecureAggregator):
    """The coordinator learns only the weighted sum of the sites' updates (Flower's SecAgg+)."""

    name: ClassVar[str] = "secagg-plus"
    Settings: ClassVar[type[BaseModel]] = SecAggPlusSettings
    description: ClassVar[str] = "Flower's SecAgg+ over the Deployment Engine: the coordinator learns only the sum"

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        #: set by the deployment's ServerApp; a simulation leaves it False and is refused at ``open``
        self.deployed = False
        self._sums: dict[int, SecureSum] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("flwr") is None:
            return "Flower (flwr) is not installed; pip install 'fedcore[deploy]'"
        return None

    def check_spec(self, spec: ExperimentSpec, components: Components) -> None:
        aggregator = type(components.aggregator)
        if aggregator.aggregate_sum is Aggregator.aggregate_sum or getattr(aggregator, "needs_individual_updates", False):
            raise SpecError(
                f"aggregator '{spec.aggregator.use}' does not aggregate from a sum, but secure aggregation "
                f"'{self.name}' reveals only the sum of the updates",
                where="secure_aggregation",
                hint="choose an aggregator that needs only the sum (fedavg, fedavgm, fedadam...)",
            )
        if spec.aggregator.use == "scaffold":
            raise SpecError(
                "SCAFFOLD sends control-variate tensors beside the update; secagg-plus sums only the weighted update",
                where="secure_aggregation.use",
                hint="use fedavg/fedprox/fedadam with secagg-plus",
            )

    def open(self, n_sites: int, template: Weights) -> None:
        if not self.deployed:
            raise PluginError(
                "secure aggregator 'secagg-plus' runs over Flower's Deployment Engine only",
                where="secure_aggregation.use",
                hint="run with 'fedcore run SPEC --federation HOST:PORT --certs DIR', or use 'crypten' in a simulation",
            )

    def provide(self, summed: SecureSum) -> None:
        """The round's sum as the SecAgg+ workflow revealed it (called by the deployment's ServerApp)."""
        self._sums[summed.round] = summed

    def secure_sum(self, round: int, updates: Sequence[ClientUpdate]) -> SecureSum:
        if round not in self._sums:
            raise PluginError(f"secagg-plus has no sum for round {round}", where="secure_aggregation.use")
        return self._sums.pop(round)
