"""Every bundled spec validates: plugins exist, settings are valid, combinations are allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.spec import load_experiment

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))


def test_specs_are_bundled() -> None:
    assert {p.name for p in SPECS} >= {"paper.yaml", "paper-epsilon-sweep.yaml", "compare-aggregators.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_bundled_spec_validates(path: Path) -> None:
    experiment = load_experiment(path)
    assert experiment.arms
    assert all(arm.spec.sweep == {} for arm in experiment.arms)


def test_paper_spec_has_the_studys_settings() -> None:
    spec = load_experiment(Path(__file__).resolve().parents[1] / "specs" / "paper.yaml").spec
    assert spec.data.settings["sites"] == 3 and spec.data.settings["patients_per_site"] == 50_000
    assert spec.model.settings["hidden"] == [128, 64, 32]
    t = spec.training
    assert (t.rounds, t.local_epochs, t.batch_size, t.optimizer, t.learning_rate) == (10, 5, 32, "adam", 0.001)
    assert spec.aggregator.use == "fedavg" and spec.repeats == 10 and spec.baseline.centralized
    assert spec.privacy[0].use == "gaussian" and spec.privacy[0].settings["epsilon"] == 1.0
    assert spec.ledger is not None and spec.ledger.use == "sqlite-chain"
