"""SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift.

Server: ``x <- x + eta_g * mean_delta`` (sample-weighted, as FedAvg) and
``c <- c + (1/N) * sum_i delta_c_i``; ``c`` goes to the sites with the global model
(:meth:`Aggregator.broadcast_extras`). Site ``i`` keeps its own ``c_i`` in its stage
(the stage lives at the site all run), trains with gradients ``g + c - c_i`` and
then sets ``c_i+`` to the mean of the raw stochastic gradients of its ``K`` local
steps. For plain SGD that is exactly the paper's option II,
``c_i - c + (x - y_i) / (K * lr)``; unlike option II it stays in gradient units
under Adam. Only ``delta_c_i = c_i+ - c_i`` leaves the site, in
``ClientUpdate.extras``, and the server reads only its sum, so SCAFFOLD works
under secure aggregation.

Under record-level DP-SGD the gradients seen here are the already privatized ones,
so ``c_i`` is post-processing. Update-level (whole-hospital) DP clips and noises the
delta only, so SCAFFOLD refuses it at spec load rather than leak ``c_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator, LocalTrainingStage, RoundContext, SiteInfo
from fedcore.errors import SpecError
from fedcore.plugins.aggregators.base import apply_step, arrays_from_state, arrays_to_state, is_float, mean_deltas
from fedcore.types import ClientUpdate, SecureSum, Weights

if TYPE_CHECKING:
    from fedcore.spec import Components, ExperimentSpec

#: name of the server control variate in the broadcast extras
CONTROL = "scaffold.control"
#: name of a site's control-variate change in ``ClientUpdate.extras``
CONTROL_DELTA = "scaffold.control_delta"


class ScaffoldSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server_learning_rate: float = Field(1.0, gt=0, description="eta_g: global step size")


class ScaffoldSiteStage(LocalTrainingStage):
    """A site's side of SCAFFOLD: holds ``c_i``, corrects every gradient, reports ``delta_c_i``."""

    def __init__(self) -> None:
        self.control: dict[str, np.ndarray] = {}  # c_i, by parameter name; zeros until the first round
        self._names: dict[int, str] = {}
        self._correction: dict[int, torch.Tensor] = {}
        self._gradient_sum: dict[int, torch.Tensor] = {}
        self._pending: tuple[int, dict[str, np.ndarray]] | None = None

    def prepare(
        self, ctx: RoundContext, module: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        server = ctx.broadcast_extras.get(CONTROL)
        self._names, self._correction, self._gradient_sum = {}, {}, {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            shape = tuple(param.shape)
            c = np.asarray(server[name], dtype=np.float64) if server is not None else np.zeros(shape)
            c_i = self.control.get(name, np.zeros(shape))
            key = id(param)  # parameters keep their identity when a later stage wraps the module
            self._names[key] = name
            self._correction[key] = torch.from_numpy(c - c_i).to(param.dtype)
            self._gradient_sum[key] = torch.zeros_like(param, dtype=torch.float64)
        return module, optimizer

    @torch.no_grad()
    def transform_gradients(self, ctx: RoundContext, parameters: Sequence[torch.nn.Parameter]) -> None:
        for param in parameters:
            key = id(param)
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            self._gradient_sum[key].add_(param.grad)
            param.grad.add_(self._correction[key])

    def finish(self, ctx: RoundContext, module: torch.nn.Module, steps: int) -> None:
        if steps == 0:
            self._pending = (ctx.round, {name: np.zeros_like(c) for name, c in self.control.items()})
            return
        delta: dict[str, np.ndarray] = {}
        for key, name in self._names.items():
            new = (self._gradient_sum[key] / steps).numpy()
            delta[name] = new - self.control.get(name, np.zeros_like(new))
            self.control[name] = new
        self._pending = (ctx.round, delta)

    def transform_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        if self._pending is None or self._pending[0] != ctx.round:
            raise RuntimeError(f"SCAFFOLD at site {ctx.site}: no control-variate change for round {ctx.round}")
        delta = self._pending[1]
        return update.model_copy(update={"extras": {**update.extras, CONTROL_DELTA: Weights(arrays=delta)}})

    def state_dict(self) -> dict[str, Any]:
        return arrays_to_state("control", self.control)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control = arrays_from_state("control", state)


class Scaffold(Aggregator[ScaffoldSettings]):
    """SCAFFOLD: server and site control variates against client drift (Karimireddy et al. 2020)."""

    name: ClassVar[str] = "scaffold"
    Settings: ClassVar[type[BaseModel]] = ScaffoldSettings
    description: ClassVar[str] = "control variates against client drift (Karimireddy et al. 2020)"

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self._control: dict[str, np.ndarray] = {}  # c, by parameter name
        self._n_sites = 0  # N: the most sites seen in one round (all of them under full participation)

    def check_spec(self, spec: ExperimentSpec, components: Components) -> None:
        for index, mechanism in enumerate(components.privacy):
            if mechanism.unit == "site":
                raise SpecError(
                    f"aggregator 'scaffold' sends control variates that privacy '{mechanism.name}' "
                    "(which protects whole sites by clipping and noising the update) does not cover",
                    where=f"privacy.{index}.use",
                    hint="use record-level DP (DP-SGD) with scaffold, or another aggregator such as fedprox",
                )

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage | None:
        return ScaffoldSiteStage()

    def broadcast_extras(self) -> dict[str, Weights]:
        return {CONTROL: Weights(arrays=self._control)} if self._control else {}

    def aggregate_sum(self, round: int, global_weights: Weights, summed: SecureSum) -> Weights:
        eta = self.settings.server_learning_rate
        control_sum = summed.extras_sum.get(CONTROL_DELTA)
        if control_sum is None:
            raise RuntimeError(f"round {round}: the sites' updates carry no '{CONTROL_DELTA}'")
        means = mean_deltas(summed)
        step = {name: eta * means[name] if is_float(current) else means[name] for name, current in global_weights.arrays.items()}
        self._n_sites = max(self._n_sites, summed.n_sites)
        self._control = {
            name: self._control.get(name, 0.0) + np.asarray(total, dtype=np.float64) / self._n_sites
            for name, total in control_sum.arrays.items()
        }
        return apply_step(global_weights, step)

    def state_dict(self) -> dict[str, Any]:
        return {**arrays_to_state("control", self._control), "n_sites": self._n_sites}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._control = arrays_from_state("control", state)
        self._n_sites = int(state.get("n_sites", 0))
