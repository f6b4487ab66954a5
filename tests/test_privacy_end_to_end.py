"""Privacy mechanisms in whole runs: accounted epsilon in the report, early stop, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedcore.cli import cli
from fedcore.engine.runner import run_experiment
from fedcore.engine.simulation import RunJob, run_federated
from fedcore.plugins.privacy.accounting import epsilon_of
from fedcore.spec import build_components, load_experiment

SPEC = """
name: privacy-e2e
seed: 3
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 500}}
training: {rounds: 3, local_epochs: 1, batch_size: 32}
privacy: [{use: gaussian, settings: {level: record, epsilon: 1.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: prv}}]
execution: {checkpoints: false}
"""


@pytest.mark.slow
def test_record_level_run_reports_the_accounted_epsilon_delta_and_unit(tmp_path: Path) -> None:
    run_dir = run_experiment(load_experiment(text=SPEC), out=tmp_path / "run", workers=1, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    [spent] = summary["arms"][0]["federated"]["runs"][0]["privacy"]
    assert 0.99 <= spent["epsilon"] <= 1.0
    assert spent["delta"] == 1e-5 and spent["unit"] == "record" and spent["accountant"] == "prv"
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    per_round = [r["privacy"][0]["epsilon"] for r in rounds]
    assert per_round == sorted(per_round) and per_round[0] < per_round[-1]
    report = (run_dir / "report.md").read_text()
    assert f"ε = {spent['epsilon']:.3f}, δ = 1e-05 (record, prv)" in report


def test_run_stopped_after_k_rounds_reports_the_epsilon_of_k_rounds() -> None:
    experiment = load_experiment(text=SPEC, overrides=["privacy.0.settings.accountant=rdp", "training.rounds=4"])
    spec = experiment.spec
    components = build_components(spec, experiment.plugins)
    data = components.dataset.load(spec.seed)
    result = run_federated(spec, RunJob(components, data, 0, spec.seed), "main", stop_after_rounds=1)
    [spent] = result.records[-1].privacy
    stages = components.privacy[0].stages.values()  # type: ignore[attr-defined]
    one_round = max(
        epsilon_of(((p.noise_multiplier, p.sample_rate, p.steps_per_round),), 1e-5, "rdp")
        for p in (stage.dp_parameters for stage in stages)
    )
    assert len(result.records) == 1
    assert spent.epsilon == pytest.approx(one_round, rel=1e-9)
    assert spent.epsilon < 0.6  # one of four rounds: far below the budget of 1.0 the run was calibrated for


def test_impossible_budget_is_refused_with_exit_2_before_anything_is_written(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(spec), "--set", "privacy.0.settings.epsilon=1e-6", "--out", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "out of reach" in lines[0] and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("privacy", "unit"),
    [
        ("{use: gaussian, settings: {level: site, epsilon: 1.0, accountant: rdp}}", "site"),
        ("{use: central-dp, settings: {epsilon: 1.0, clipping: adaptive, accountant: rdp}}", "site"),
    ],
)
def test_site_level_and_central_dp_runs_are_accounted(tmp_path: Path, privacy: str, unit: str) -> None:
    text = SPEC.replace(SPEC.splitlines()[5], f"privacy: [{privacy}]")
    run_dir = run_experiment(load_experiment(text=text), out=tmp_path / "run", workers=1, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    [spent] = summary["arms"][0]["federated"]["runs"][0]["privacy"]
    assert spent["unit"] == unit and 0.99 <= spent["epsilon"] <= 1.0 and spent["steps"] == 3
