"""Demo data for a local federation: the synthetic EHR generator's tables, one CSV and site.yaml per site."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from fedcore.plugins.deploy.certs import FederationCerts
from fedcore.plugins.datasets.synthetic import CATEGORICAL, CONTINUOUS, TARGET, SyntheticEHR


def site_yaml(name: str, table: str, signing_key: str, state_dir: str) -> dict[str, object]:
    """A site file for one of the demo tables (declared column types: no guessing per site)."""
    return {
        "site": name,
        "data": {"path": table, "target": TARGET, "continuous": list(CONTINUOUS), "categorical": list(CATEGORICAL)},
        "state_dir": state_dir,
        "signing_key": signing_key,
    }


def write_demo_sites(out: Path, certs_dir: Path, sites: int, patients: int, seed: int) -> list[Path]:
    """``out/<site>.csv`` and ``out/<site>.yaml`` for the sites in ``certs_dir/sites.json`` (first ``sites``)."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(FederationCerts(certs_dir).registry())[:sites]
    dataset = SyntheticEHR(SyntheticEHR.Settings(sites=len(names), patients_per_site=patients))  # type: ignore[call-arg]
    written: list[Path] = []
    for name, raw in zip(names, dataset.raw_sites(seed), strict=True):
        table = out / f"{name}.csv"
        raw.frame.to_csv(table, index=False)
        key = os.path.relpath(certs_dir.resolve() / name / "signing.key", out.resolve())
        config = site_yaml(name, table.name, key, f"state/{name}")
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        written += [table, out / f"{name}.yaml"]
    return written
