"""Byzantine-robust aggregators: they look at every individual update.

Each sets ``needs_individual_updates``, so the core refuses it under secure
aggregation. Sample counts are reported by the sites themselves, and a malicious
site could inflate its own, so these rules weight every site equally (as the papers do).

- ``median``: coordinate-wise median (Yin et al. 2018).
- ``trimmed-mean``: per coordinate, drop the ``floor(beta * n)`` largest and smallest
  values and average the rest (Yin et al. 2018).
- ``krum``: the update whose summed squared distance to its ``n - f - 2`` nearest
  neighbours is smallest; ``multi-krum`` averages the ``m`` best-scored ones
  (Blanchard et al. 2017). Both need ``n >= 2f + 3`` sites.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Aggregator, LocalTrainingStage, SiteInfo
from fedcore.errors import SpecError
from fedcore.plugins.aggregators.base import apply_step, known_site_count, stacked_deltas
from fedcore.types import ClientUpdate, SecureSum, Weights

if TYPE_CHECKING:
    from fedcore.spec import Components, ExperimentSpec


class RobustAggregator(Aggregator):
    """An aggregator that combines individual updates; it cannot work from a secure sum."""

    needs_individual_updates: ClassVar[bool] = True

    def robust_step(self, deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step to add to the global weights, from deltas stacked one row per site."""
        raise NotImplementedError

    def check_site_count(self, n_sites: int) -> None:
        """Raise :class:`SpecError` when ``n_sites`` is too few for these settings."""

    def check_spec(self, spec: ExperimentSpec, components: Components) -> None:
        n_sites = known_site_count(components)
        if n_sites is not None:
            self.check_site_count(n_sites)

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage | None:
        # Stages are built before training starts, with the real site count: the last
        # place to refuse too few sites cleanly when the dataset learns it only at load.
        self.check_site_count(site.n_sites)
        return None

    def aggregate(self, round: int, global_weights: Weights, updates: Sequence[ClientUpdate]) -> Weights:
        self.check_site_count(len(updates))
        return apply_step(global_weights, self.robust_step(stacked_deltas(updates)))

    def aggregate_sum(self, round: int, global_weights: Weights, summed: SecureSum) -> Weights:
        raise SpecError(
            f"aggregator '{self.name}' needs individual updates and cannot aggregate a secure sum",
            where="aggregator.use",
            hint="remove secure_aggregation or choose fedavg, fedavgm, fedadam...",
        )


class MedianSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Median(RobustAggregator):
    """Coordinate-wise median of the updates (Yin et al. 2018)."""

    name: ClassVar[str] = "median"
    Settings: ClassVar[type[BaseModel]] = MedianSettings
    description: ClassVar[str] = "coordinate-wise median (Yin et al. 2018)"

    def robust_step(self, deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.median(stack, axis=0) for name, stack in deltas.items()}


class TrimmedMeanSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    beta: float = Field(0.2, gt=0, lt=0.5, description="fraction trimmed from each end, per coordinate")


class TrimmedMean(RobustAggregator):
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): drop floor(beta n) values at each end."""

    name: ClassVar[str] = "trimmed-mean"
    Settings: ClassVar[type[BaseModel]] = TrimmedMeanSettings
    description: ClassVar[str] = "coordinate-wise trimmed mean (Yin et al. 2018)"

    def trimmed(self, n_sites: int) -> int:
        return math.floor(self.settings.beta * n_sites + 1e-9)  # type: ignore[attr-defined]

    def check_site_count(self, n_sites: int) -> None:
        if self.trimmed(n_sites) == 0:
            beta = self.settings.beta  # type: ignore[attr-defined]
            raise SpecError(
                f"trimmed-mean with beta={beta} trims nothing from {n_sites} sites (floor(beta * n) = 0)",
                where="aggregator.settings.beta",
                hint=f"set beta to at least {1 / n_sites:.3g} (and below 0.5), or use median",
            )

    def robust_step(self, deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, stack in deltas.items():
            k = self.trimmed(len(stack))
            out[name] = np.sort(stack, axis=0)[k : len(stack) - k].mean(axis=0)
        return out


class KrumSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    f: int = Field(1, ge=0, description="number of Byzantine sites tolerated; needs n >= 2f + 3")


class MultiKrumSettings(KrumSettings):
    m: int | None = Field(None, ge=1, description="updates averaged; default n - f")


def krum_scores(flat: np.ndarray, f: int) -> np.ndarray:
    """Each row's summed squared distance to its ``n - f - 2`` nearest other rows."""
    n = len(flat)
    squared = np.sum(flat**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * flat @ flat.T, 0.0)
    neighbours = n - f - 2
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(distances[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


class Krum(RobustAggregator):
    """The one update closest to its n - f - 2 nearest neighbours (Blanchard et al. 2017)."""

    name: ClassVar[str] = "krum"
    Settings: ClassVar[type[BaseModel]] = KrumSettings
    description: ClassVar[str] = "Krum (Blanchard et al. 2017)"

    def check_site_count(self, n_sites: int) -> None:
        f = self.settings.f  # type: ignore[attr-defined]
        if n_sites < 2 * f + 3:
            raise SpecError(
                f"{self.name} with f={f} needs at least 2f + 3 = {2 * f + 3} sites, the data has {n_sites}",
                where="aggregator.settings.f",
                hint=f"lower f to at most {max((n_sites - 3) // 2, 0)} or add sites",
            )

    def selected(self, flat: np.ndarray) -> np.ndarray:
        """Indices of the chosen rows, best score first (ties: lower site index)."""
        scores = krum_scores(flat, self.settings.f)  # type: ignore[attr-defined]
        return np.argsort(scores, kind="stable")[:1]

    def robust_step(self, deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(deltas.values())))
        flat = np.concatenate([stack.reshape(n, -1) for stack in deltas.values()], axis=1)
        chosen = self.selected(flat)
        return {name: stack[chosen].mean(axis=0) for name, stack in deltas.items()}


class MultiKrum(Krum):
    """The mean of the m best Krum-scored updates (Blanchard et al. 2017); m defaults to n - f."""

    name: ClassVar[str] = "multi-krum"
    Settings: ClassVar[type[BaseModel]] = MultiKrumSettings
    description: ClassVar[str] = "Multi-Krum (Blanchard et al. 2017)"

    def check_site_count(self, n_sites: int) -> None:
        super().check_site_count(n_sites)
        m = self.settings.m  # type: ignore[attr-defined]
        if m is not None and m > n_sites:
            raise SpecError(
                f"multi-krum averages m={m} updates but the data has {n_sites} sites",
                where="aggregator.settings.m",
                hint=f"set m to at most {n_sites} (or leave it out for n - f)",
            )

    def selected(self, flat: np.ndarray) -> np.ndarray:
        s: MultiKrumSettings = self.settings  # type: ignore[assignment]
        m = s.m if s.m is not None else len(flat) - s.f
        return np.argsort(krum_scores(flat, s.f), kind="stable")[:m]
