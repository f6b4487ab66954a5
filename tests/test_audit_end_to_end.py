"""Audits can fail: an overfit model leaks measurably, a strongly private one does not.

Real training by fedcore's engine, real shadow runs, real DP-SGD with its accountant.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcore.report import build_report
from fedcore.testing import run_spec_text

#: tiny data (half the rows held out), a wide MLP, many epochs: a model that memorizes
OVERFIT = """\
name: overfit
seed: 1
repeats: 1
data: {use: synthetic-ehr, settings: {sites: 2, patients_per_site: 1000, split: [0.5, 0.4, 0.1]}}
model: {use: mlp, settings: {hidden: [256, 256]}}
training: {rounds: 20, local_epochs: 10, batch_size: 32, learning_rate: 0.003}
sweep:
  privacy:
    - []
    - [{use: gaussian, settings: {level: record, epsilon: 0.5, delta: 1.0e-5}}]
audits:
  - {use: membership-loss}
  - {use: membership-lira, settings: {shadows: 4, shadow_fraction: 0.5}}
  - {use: epsilon-lower-bound}
execution: {progress: false, reproducible_noise: true}
"""


def _audits(summary: dict, arm_index: int) -> dict[str, dict]:
    run = summary["arms"][arm_index]["federated"]["runs"][0]
    return {a["audit"]: a for a in run["audits"]}


@pytest.mark.slow
def test_overfit_model_leaks_and_strong_dp_does_not(tmp_path: Path) -> None:
    run_dir = run_spec_text(OVERFIT, tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [a["label"] for a in summary["arms"]][0] == "privacy=none"

    leaky = _audits(summary, 0)
    assert leaky["membership-loss"]["pooled"]["auc"] > 0.65
    assert leaky["membership-lira"]["pooled"]["auc"] > 0.6
    assert len(leaky["membership-loss"]["per_site"]) == 2
    bound = leaky["epsilon-lower-bound"]["bound"]
    assert bound["epsilon"] > 1, bound  # the bound has power
    assert bound["accounted_epsilon"] is None and not bound["exceeds_accounted"]

    private = _audits(summary, 1)
    accounted = summary["arms"][1]["federated"]["runs"][0]["privacy"][0]["epsilon"]
    assert abs(private["membership-loss"]["pooled"]["auc"] - 0.5) < 0.06
    assert abs(private["membership-lira"]["pooled"]["auc"] - 0.5) < 0.08
    bound = private["epsilon-lower-bound"]["bound"]
    assert bound["accounted_epsilon"] == pytest.approx(accounted)
    assert bound["epsilon"] < accounted and not bound["exceeds_accounted"]

    report = (run_dir / "report.md").read_text()
    assert "## Audits: measured leakage" in report and "`membership-lira`" in report
    assert "AUDIT BOUND EXCEEDS" not in report
    assert "figures/leakage.png" in report and (run_dir / "figures" / "leakage.png").stat().st_size > 10_000
    # The report is rebuilt from the files alone.
    assert build_report(run_dir).read_text() == report
