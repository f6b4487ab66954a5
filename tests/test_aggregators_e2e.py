"""End to end: the comparison specs run through the real engine and write their table and figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedcore.engine.runner import run_experiment
from fedcore.spec import load_experiment

SPECS = Path(__file__).resolve().parents[1] / "specs"
AGGREGATORS = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold", "median", "trimmed-mean"]


def test_compare_aggregators_has_one_arm_per_aggregator_on_shared_data() -> None:
    experiment = load_experiment(SPECS / "compare-aggregators.yaml")
    assert [arm.spec.aggregator.use for arm in experiment.arms] == AGGREGATORS
    assert len({arm.spec.data.model_dump_json() for arm in experiment.arms}) == 1
    assert len({arm.spec.training.model_dump_json() for arm in experiment.arms}) == 1
    assert experiment.arms[1].spec.aggregator.settings["mu"] == 0.01  # each arm keeps its settings


def test_compare_under_attack_crosses_aggregators_with_clean_and_attacked_runs() -> None:
    experiment = load_experiment(SPECS / "compare-under-attack.yaml")
    uses = {arm.spec.aggregator.use for arm in experiment.arms}
    assert uses == {*AGGREGATORS, "krum", "multi-krum"}
    attacked = [arm for arm in experiment.arms if arm.spec.attacks]
    assert len(attacked) == len(experiment.arms) // 2
    assert {(a.spec.attacks[0].use, a.spec.attacks[0].settings["scale"]) for a in attacked} == {("sign-flip", 10.0)}
    assert experiment.spec.data.settings["sites"] == 5


@pytest.mark.slow
def test_compare_aggregators_runs_and_writes_table_figure_and_state(tmp_path: Path) -> None:
    experiment = load_experiment(
        SPECS / "compare-aggregators.yaml",
        [
            "repeats=1",
            "data.settings.patients_per_site=150",
            "training.rounds=2",
            "training.local_epochs=1",
            "baseline.centralized=false",
        ],
    )
    run = run_experiment(experiment, out=tmp_path / "run", workers=1, progress=False)
    report = (run / "report.md").read_text()
    table = report.split("## Comparison of arms", 1)[1]
    for name in AGGREGATORS:
        assert f"| aggregator={name}" in table
    assert (run / "figures" / "accuracy.png").stat().st_size > 10_000
    summary = json.loads((run / "summary.json").read_text())
    assert all(arm["federated"]["runs"][0]["rounds"] == 2 for arm in summary["arms"])
    # server state reaches the checkpoint and loads without unpickling arbitrary objects
    state = torch.load(next((run / "checkpoints").glob("*scaffold*-aggregator.pt")), weights_only=True)
    assert any(key.startswith("control/") and value.abs().sum() > 0 for key, value in state.items() if key != "n_sites")
    state = torch.load(next((run / "checkpoints").glob("*fedadam*-aggregator.pt")), weights_only=True)
    assert {key.split("/")[0] for key in state} == {"m", "v"}


@pytest.mark.slow
def test_robust_aggregators_withstand_a_sign_flipping_site(tmp_path: Path) -> None:
    experiment = load_experiment(
        SPECS / "compare-under-attack.yaml",
        [
            "repeats=1",
            "data.settings.patients_per_site=1000",
            "training.rounds=4",
            "training.local_epochs=1",
            "execution.checkpoints=false",
            "sweep.aggregator=[{use: fedavg}, {use: median}, {use: multi-krum, settings: {f: 1}}]",
        ],
    )
    run = run_experiment(experiment, out=tmp_path / "run", workers=1, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    accuracy = {
        (arm["aggregator"]["use"], bool(dict(arm["assignments"])["attacks"])): arm["federated"]["aggregate"]["accuracy"]["mean"]
        for arm in summary["arms"]
    }
    assert accuracy[("fedavg", True)] < accuracy[("fedavg", False)] - 0.2
    for robust in ("median", "multi-krum"):
        assert accuracy[(robust, True)] > accuracy[(robust, False)] - 0.04, robust


@pytest.mark.slow
def test_scaffold_runs_under_secure_aggregation_from_the_sums_alone(tmp_path: Path) -> None:
    from fedcore.registry import PluginManager

    secure = [e for e in PluginManager().entries() if e.kind == "secure_aggregator" and e.unavailable_reason is None]
    if not secure:
        pytest.skip("no secure aggregator installed")
    text = f"""\
name: scaffold-secure
seed: 1
data: {{use: synthetic-ehr, settings: {{sites: 3, patients_per_site: 300}}}}
model: {{use: mlp, settings: {{hidden: [16]}}}}
training: {{rounds: 2, local_epochs: 1}}
aggregator: {{use: scaffold}}
secure_aggregation: {{use: {secure[0].name}}}
"""
    run = run_experiment(load_experiment(None, text=text), out=tmp_path / "run", workers=1, progress=False)
    state = torch.load(next((run / "checkpoints").glob("*-aggregator.pt")), weights_only=True)
    assert state["n_sites"] == 3
    assert sum(float(v.abs().sum()) for k, v in state.items() if k.startswith("control/")) > 0
