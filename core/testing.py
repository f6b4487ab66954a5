"""Helpers for plugin authors' tests (and fedcore's own).

    from fedcore.testing import check_component, tiny_federated_data, run_spec_text

``check_component`` asserts the component contract; ``tiny_federated_data``
makes a small seeded dataset; ``run_spec_text`` runs a spec given as YAML text
in-process and returns the run directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from fedcore.components import COMPONENT_KINDS, Component, FederatedData, SiteData


def check_component(cls: type[Component]) -> None:
    """Assert that ``cls`` follows the component contract (name, kind, strict Settings, docstring)."""
    assert isinstance(cls.name, str) and cls.name, f"{cls.__name__} needs a non-empty `name`"
    assert any(issubclass(cls, base) for base in COMPONENT_KINDS.values()), f"{cls.__name__} is not a component"
    assert issubclass(cls.Settings, BaseModel), f"{cls.__name__}.Settings must be a pydantic model"
    assert cls.Settings.model_config.get("extra") == "forbid", f"{cls.__name__}.Settings needs extra='forbid'"
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} needs a docstring"


def tiny_federated_data(
    sites: int = 3, rows: int = 300, features: int = 6, classes: int = 3, seed: int = 0
) -> FederatedData:
    """A small, learnable, seeded dataset (80/10/10 per site)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(features, classes))
    out: list[SiteData] = []
    for site in range(sites):
        x = rng.normal(size=(rows, features)).astype(np.float32)
        y = (x @ weights + rng.normal(scale=0.5, size=(rows, classes))).argmax(axis=1).astype(np.int64)
        a, b = int(0.8 * rows), int(0.9 * rows)
        out.append(SiteData(site, f"site-{site}", x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:]))
    return FederatedData(
        sites=out, feature_names=[f"f{i}" for i in range(features)], class_names=[str(c) for c in range(classes)]
    )


def run_spec_text(
    text: str,
    out: Path,
    overrides: Sequence[str] = (),
    extra_plugins: Iterable[object] = (),
    workers: int = 1,
) -> Path:
    """Validate and run a YAML spec in this process; returns the run directory."""
    from fedcore.engine.runner import run_experiment
    from fedcore.registry import PluginManager
    from fedcore.spec import load_experiment

    plugins = PluginManager(extra_plugins=extra_plugins)
    experiment = load_experiment(None, overrides, plugins, text=text)
    return run_experiment(experiment, out=out, workers=workers, progress=False)
