"""Simulated misbehaving sites: data poisoning (label flipping) and model poisoning.

Every attack names the sites it controls in ``sites``; the engine gives its stage
to those sites only. Update attacks act on the floating-point arrays of the delta
(integer buffers are counters, not a signal) and leave ``extras`` untouched.
Random draws come from a generator seeded by the run seed and the site, so an
attacked run is as reproducible as a clean one.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedcore.components import Attack, LocalTrainingStage, RoundContext, SiteInfo
from fedcore.errors import SpecError
from fedcore.types import ClientUpdate, Weights

if TYPE_CHECKING:
    from fedcore.spec import Components, ExperimentSpec


class AttackSettings(BaseModel):
    """Settings every attack shares: which sites misbehave."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: list[int] = Field(min_length=1, description="indexes of the attacked sites (0-based)")

    @field_validator("sites")
    @classmethod
    def _distinct_nonnegative(cls, sites: list[int]) -> list[int]:
        if any(s < 0 for s in sites):
            raise ValueError("site indexes start at 0")
        if len(set(sites)) != len(sites):
            raise ValueError("a site is listed twice")
        return sites


class PoisoningAttack(Attack):
    """Common checks: the attacked sites must exist."""

    def _where(self, components: Components) -> str:
        index = next(i for i, a in enumerate(components.attacks) if a is self)
        return f"attacks.{index}.settings.sites"

    def check_spec(self, spec: ExperimentSpec, components: Components) -> None:
        n_sites = getattr(components.dataset.settings, "sites", None)
        if not isinstance(n_sites, int) or isinstance(n_sites, bool):
            return  # known only when the data loads; site_stage checks it then
        self._check_sites(n_sites, self._where(components))

    def _check_sites(self, n_sites: int, where: str) -> None:
        missing = [s for s in self.attacked_sites() if s >= n_sites]
        if missing:
            raise SpecError(
                f"attack '{self.name}' targets site(s) {missing}, but the data has {n_sites} sites",
                where=where,
                hint=f"use site indexes 0..{n_sites - 1}",
            )

    @property
    def where_at_load(self) -> str:
        return f"attacks ({self.name}).settings.sites"

    def site_generator(self, site: SiteInfo) -> np.random.Generator:
        """This attack's own random stream at ``site`` (independent of the site's training stream)."""
        return np.random.default_rng([site.seed, site.site, zlib.crc32(self.name.encode())])


def map_float_arrays(delta: Weights, fn: object) -> Weights:
    """``fn`` applied to each floating-point array of ``delta``; integer arrays unchanged."""
    return Weights(
        arrays={
            name: (fn(array).astype(array.dtype) if np.issubdtype(array.dtype, np.floating) else array)  # type: ignore[operator]
            for name, array in delta.arrays.items()
        }
    )


# ------------------------------------------------------------------ label flipping


class LabelFlipSettings(AttackSettings):
    fraction: float = Field(1.0, gt=0, le=1, description="share of the site's training rows whose label flips")


class LabelFlipStage(LocalTrainingStage):
    """Trains on labels mapped ``y -> (n_classes - 1 - y)`` for a fixed subset of rows."""

    def __init__(self, n_classes: int, fraction: float, generator: np.random.Generator) -> None:
        self.n_classes = n_classes
        self.fraction = fraction
        self.generator = generator
        self._rows: torch.Tensor | None = None

    def transform_training_data(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None or len(self._rows) != len(y):
            # Chosen once: the same poisoned rows every round, as a corrupted record set would be.
            chosen = self.generator.random(len(y)) < self.fraction
            self._rows = torch.from_numpy(chosen)
        flipped = torch.where(self._rows, (self.n_classes - 1) - y, y)
        return x, flipped


class LabelFlip(PoisoningAttack):
    """Data poisoning: the site trains on flipped labels (class c becomes n_classes - 1 - c)."""

    name: ClassVar[str] = "label-flip"
    Settings: ClassVar[type[BaseModel]] = LabelFlipSettings
    description: ClassVar[str] = "train on flipped labels (c -> n_classes - 1 - c)"

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage | None:
        self._check_sites(site.n_sites, self.where_at_load)
        return LabelFlipStage(site.n_classes, self.settings.fraction, self.site_generator(site))  # type: ignore[attr-defined]


# ------------------------------------------------------------------ update poisoning


class SignFlipSettings(AttackSettings):
    scale: float = Field(1.0, gt=0, description="the released delta is -scale * delta")


class SignFlipStage(LocalTrainingStage):
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def transform_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        return update.model_copy(update={"delta": map_float_arrays(update.delta, lambda a: a * self.factor)})


class SignFlip(PoisoningAttack):
    """Model poisoning: the site releases its honest update sign-flipped and scaled (-scale * delta)."""

    name: ClassVar[str] = "sign-flip"
    Settings: ClassVar[type[BaseModel]] = SignFlipSettings
    description: ClassVar[str] = "release -scale x the honest update"

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage | None:
        self._check_sites(site.n_sites, self.where_at_load)
        return SignFlipStage(-self.settings.scale)  # type: ignore[attr-defined]


class ScaleSettings(AttackSettings):
    factor: float = Field(10.0, description="the released delta is factor * delta (boosting)")


class Scale(PoisoningAttack):
    """Model poisoning by boosting: the site releases ``factor x`` its honest update."""

    name: ClassVar[str] = "scale"
    Settings: ClassVar[type[BaseModel]] = ScaleSettings
    description: ClassVar[str] = "release factor x the honest update"

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage | None:
        self._check_sites(site.n_sites, self.where_at_load)
        return SignFlipStage(self.settings.factor)  # type: ignore[attr-defined]


class RandomNoiseSettings(AttackSettings):
    std: float = Field(1.0, gt=0, description="standard deviation of the Gaussian noise")
    mode: Literal["replace", "add"] = Field("replace", description="send pure noise, or the update plus noise")


class RandomNoiseStage(LocalTrainingStage):
    def __init__(self, std: float, replace: bool, generator: np.random.Generator) -> None:
        self.std = std
        self.replace = replace
        self.generator = generator

    def _noise(self, array: np.ndarray) -> np.ndarray:
        noise = self.generator.normal(0.0, self.std, size=array.shape)
        return noise if self.replace else array + noise

    def transform_update(self, ctx: RoundContext, update: ClientUpdate) -> ClientUpdate:
        return update.model_copy(update={"delta": map_float_arrays(update.delta, self._noise)})


class RandomNoise(PoisoningAttack):
    """Model poisoning with Gaussian noise: the site sends N(0, std^2) (or adds it to its update)."""

    name: ClassVar[str] = "random-noise"
    Settings: ClassVar[type[BaseModel]] = RandomNoiseSettings
    description: ClassVar[str] = "release Gaussian noise instead of (or on top of) the update"

    def site_stage(self, site: SiteInfo) -> LocalTrainingStage | None:
        self._check_sites(site.n_sites, self.where_at_load)
        s: RandomNoiseSettings = self.settings  # type: ignore[assignment]
        return RandomNoiseStage(s.std, s.mode == "replace", self.site_generator(site))
