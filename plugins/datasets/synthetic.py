"""synthetic-ehr: seeded EHR-like tabular data for N hospitals."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Dataset, FederatedData, SiteData


class SyntheticEHRSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: int = Field(3, ge=1)
    patients_per_site: int = Field(50_000, ge=10)
    n_classes: int = Field(3, ge=2)
    label_noise: float = Field(0.1, ge=0, le=1)


class SyntheticEHR(Dataset):
    """Demographics, labs and history with a nonlinear multi-class outcome; split 80/10/10."""

    name: ClassVar[str] = "synthetic-ehr"
    Settings: ClassVar[type[BaseModel]] = SyntheticEHRSettings
    description: ClassVar[str] = "seeded synthetic EHR tables for N hospitals"

    def load(self, seed: int) -> FederatedData:
        s: SyntheticEHRSettings = self.settings  # type: ignore[assignment]
        rng = np.random.default_rng(seed)
        n_features = 20
        mixing = rng.normal(size=(n_features, s.n_classes * 4))
        head = rng.normal(size=(s.n_classes * 4, s.n_classes))
        sites = []
        for site in range(s.sites):
            n = s.patients_per_site
            shift = rng.normal(scale=0.3, size=n_features)
            x = rng.normal(size=(n, n_features)) + shift
            logits = np.tanh(x @ mixing / np.sqrt(n_features)) @ head * 2.0
            y = logits.argmax(axis=1)
            flip = rng.random(n) < s.label_noise
            y[flip] = rng.integers(0, s.n_classes, flip.sum())
            order = rng.permutation(n)
            a, b = int(0.8 * n), int(0.9 * n)
            parts = [order[:a], order[a:b], order[b:]]
            x = x.astype(np.float32)
            y = y.astype(np.int64)
            sites.append(
                SiteData(site, f"hospital-{site}", x[parts[0]], y[parts[0]], x[parts[1]], y[parts[1]], x[parts[2]], y[parts[2]])
            )
        return FederatedData(
            sites=sites,
            feature_names=[f"x{i}" for i in range(n_features)],
            class_names=[str(c) for c in range(s.n_classes)],
        )
