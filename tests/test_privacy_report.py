"""The report under DP: no exact per-site counts, the list of what was released outside the
guarantee (from fedcore.releases), the reproducible mode's warning, the non-private models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcore.report import build_report
from fedcore.testing import run_spec_text

SPEC = """
name: report-under-dp
seed: 4
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 150}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 1, local_epochs: 1, batch_size: 64}
aggregator: {use: fedavg}
privacy:
  - use: gaussian
    settings: {level: record, epsilon: 4.0, delta: 1.0e-3, accountant: rdp}
baseline: {centralized: true}
execution: {progress: false, reproducible_noise: true}
"""


@pytest.mark.slow
def test_report_under_record_level_dp(tmp_path: Path) -> None:
    run_dir = run_spec_text(SPEC, tmp_path / "run")
    report = (run_dir / "report.md").read_text()
    assert "### Data: class balance" not in report and "### Data: values imputed" not in report
    assert "Withheld under DP (exact per-site counts)" in report
    assert "Released outside the guarantee" in report
    outside = report.split("Released outside the guarantee")[1].split("##")[0]
    assert "`ClientUpdate` `n_samples`" in outside and "`train_loss`" in outside and "`test_confusion`" in outside
    assert "`delta`" not in outside and "scaffold" not in outside  # protected; not sent in this run
    assert "Not private against anyone who knows the seed (4)" in report
    assert "Non-private models in this directory" in report

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert "Data: class balance" not in summary["data"]["sections"]  # not kept in the run's files either
    assert "Data: class balance" in summary["data"]["withheld_sections"]

    # Without DP the same report shows the sections (a summary edited to have no DP arm).
    summary["reproducible_noise"] = False
    summary["data"]["sections"]["Data: class balance"] = "| site | a | b |"
    summary["data"]["withheld_sections"] = []
    for arm in summary["arms"]:
        arm["privacy_specs"] = []
    summary_path.write_text(json.dumps(summary))
    plain = build_report(run_dir).read_text()
    assert "### Data: class balance" in plain and "not private against anyone" not in plain.lower()
