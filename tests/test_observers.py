"""Observers as components: ``observers:`` in a spec, settings validated, listed by the
registry; the reference ``csv`` and ``mlflow`` observers (MLflow's runs read back with
MLflow's own client from a local store, no server); a raising observer never stops a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcore import hookimpl
from fedcore.components import Observer
from fedcore.engine.runner import run_experiment
from fedcore.errors import SpecError
from fedcore.registry import PluginManager
from fedcore.spec import load_experiment

SPEC = """
name: observed
seed: 2
repeats: 2
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 50, n_classes: 3}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 2, local_epochs: 1, batch_size: 16}
baseline: {centralized: true, epochs: 2}
evaluation: {metrics: [accuracy, auroc], primary: auroc}
sweep: {aggregator: [{use: fedavg}, {use: fedprox, settings: {mu: 0.01}}]}
execution: {workers: 1, progress: false, checkpoints: false}
"""


def test_observers_are_components_with_validated_settings() -> None:
    plugins = PluginManager()
    assert {"csv", "mlflow"} <= set(plugins.names("observer"))
    with pytest.raises(SpecError) as info:
        load_experiment(text=SPEC + "observers: [{use: csv, settings: {colour: red}}]\n")
    assert "observers.0.settings.colour" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SpecError, match="cannot sweep 'observers'"):
        load_experiment(text=SPEC.replace("sweep: {", "sweep: {observers: [[], [{use: csv}]], "))


def test_mlflow_and_csv_observers(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'fedcore[mlflow]'")
    from mlflow.tracking import MlflowClient

    torch.set_num_threads(1)
    store = tmp_path / "tracking" / "mlflow.db"
    text = SPEC + f"observers: [{{use: csv}}, {{use: mlflow, settings: {{tracking_uri: '{store}'}}}}]\n"
    run_dir = run_experiment(load_experiment(text=text), out=tmp_path / "run", workers=1, progress=False)
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]

    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    assert len(rows) == len(records)
    assert [float(r["test_auroc"]) for r in rows] == pytest.approx([r["test"]["scores"]["auroc"] for r in records])

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("observed")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    keys = {(r.data.tags["fedcore.arm"], int(r.data.tags["fedcore.repeat"]), r.data.tags["fedcore.mode"]) for r in runs}
    assert keys == {(r["arm"], r["repeat"], r["mode"]) for r in records}  # one MLflow run per (arm, repeat, mode)
    assert len(runs) == 2 * 2 + 2  # two arms x two repeats, one shared centralized baseline x two repeats
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["training.rounds"] == "2" and run.data.params["evaluation.primary"] == "auroc"
        arm, repeat, mode = run.data.tags["fedcore.arm"], int(run.data.tags["fedcore.repeat"]), run.data.tags["fedcore.mode"]
        mine = sorted((r for r in records if (r["arm"], r["repeat"], r["mode"]) == (arm, repeat, mode)), key=lambda r: r["round"])
        history = client.get_metric_history(run.info.run_id, "test_auroc")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [r["round"] for r in mine]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["test"]["scores"]["auroc"] for r in mine])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report.md", "summary.json", "figures"} <= artifacts


class Broken(Observer):
    """A fake observer that raises in every method (labelled a fake: it tests isolation)."""

    name = "broken"
    seen: list[str] = []

    def run_start(self, spec: Any, run_dir: Path, n_runs: int) -> None:
        Broken.seen.append("start")
        raise RuntimeError("boom")

    def round_end(self, record: Any) -> None:
        raise RuntimeError("boom")


class _Plugin:
    @hookimpl
    def fedcore_observers(self) -> list[type[Observer]]:
        return [Broken]


def test_a_raising_observer_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(1)
    plugins = PluginManager(extra_plugins=[_Plugin()])
    text = SPEC.replace("repeats: 2", "repeats: 1") + "observers: [{use: broken}]\n"
    run_dir = run_experiment(load_experiment(text=text, plugins=plugins), out=tmp_path / "run", workers=1, progress=False)
    assert (run_dir / "report.md").is_file() and Broken.seen == ["start"]
    assert "observer plugin 'observers[0]:broken' raised in fedcore_round_end" in caplog.text
    # detached after the run: the plugin manager holds no spec observer any more
    assert not [p for p in plugins.hook.fedcore_round_end.get_hookimpls() if p.plugin_name.startswith("observers[")]
