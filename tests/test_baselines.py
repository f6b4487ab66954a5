"""The local-only and cyclic baselines (``baseline: {local, cyclic}``) and ``baseline.training``:
the same splits, initial model and site seeds as the federated arms, scored per site and
pooled, in Table I and the comparison table; trained on the sequential engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.engine.runner import SEQUENTIAL_BASELINE, plan_jobs, preflight, run_experiment
from fedcore.spec import load_experiment

SPEC = """
name: baselines
seed: 5
repeats: 1
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 60, n_classes: 3}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 2, local_epochs: 1, batch_size: 16}
execution: {workers: 1, progress: false, checkpoints: false}
"""


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_cyclic_over_one_site_is_fedavg_over_one_site(tmp_path: Path) -> None:
    """One centre: a cyclic round is a FedAvg round (the model starts where the last ended)."""
    torch.set_num_threads(1)
    spec = load_experiment(
        text=SPEC.replace("sites: 3", "sites: 1") + "baseline: {cyclic: true}\n", overrides=["execution.engine=sequential"]
    )
    records = _records(run_experiment(spec, out=tmp_path / "run", workers=1, progress=False))
    by_mode = {m: [r for r in records if r["mode"] == m] for m in ("federated", "cyclic")}
    assert len(by_mode["cyclic"]) == len(by_mode["federated"]) == 2
    for fed, cyc in zip(by_mode["federated"], by_mode["cyclic"], strict=True):
        assert cyc["epoch"] == fed["epoch"]
        for split in ("validation", "test"):
            assert cyc[split]["accuracy"] == fed[split]["accuracy"]
            assert cyc[split]["loss"] == pytest.approx(fed[split]["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    text = SPEC + (
        "baseline: {centralized: true, local: true, cyclic: true, epochs: 3}\n"
        "evaluation: {metrics: [accuracy, auroc], primary: accuracy}\n"
        "sweep: {aggregator: [{use: fedavg}, {use: fedadam, settings: {server_learning_rate: 0.03}}]}\n"
    )
    return run_experiment(load_experiment(text=text), out=tmp_path_factory.mktemp("b") / "run", workers=1, progress=False)


def test_local_baseline_scores_each_centre_on_its_own_splits(run_dir: Path) -> None:
    local = [r for r in _records(run_dir) if r["mode"] == "local"]
    assert [r["epoch"] for r in local] == [1, 2, 3]  # baseline.epochs, once for both arms (same data, model, training)
    for record in local:
        assert len(record["per_site"]) == 3
        # pooled = the centres' own models' confusion matrices summed
        conf = np.sum([s["test_confusion"] for s in record["per_site"]], axis=0)
        assert record["test"]["n"] == int(conf.sum())
        assert record["test"]["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    cyclic = [r for r in _records(run_dir) if r["mode"] == "cyclic"]
    assert [r["epoch"] for r in cyclic] == [1, 2] and all(len(r["per_site"]) == 3 for r in cyclic)


def test_baselines_in_summary_and_tables(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["arms"]
    for mode in ("centralized", "local", "cyclic"):
        assert first[mode]["of_arm"] == first["label"] and second[mode]["of_arm"] == first["label"]
        assert len(first[mode]["runs"]) == 1
    report = (run_dir / "report.md").read_text()
    assert "| Metric | Centralized | Local only | Cyclic | Federated | Deviation (points) |" in report
    assert "| baseline: local only |" in report and "| baseline: cyclic |" in report and "| baseline: centralized |" in report
    assert "Local-only models, each on its own centre (final epoch):" in report
    assert "Cyclic model per site (final round):" in report
    assert "Centralized model per site (final epoch):" in report  # with local/cyclic: every baseline per site
    centralized = [r for r in _records(run_dir) if r["mode"] == "centralized"]
    assert centralized and all(len(r["per_site"]) == 3 for r in centralized)
    assert centralized[-1]["test"]["n"] == sum(s["test"]["n"] for s in centralized[-1]["per_site"])


def test_same_spec_same_numbers(run_dir: Path, tmp_path: Path) -> None:
    text = (run_dir / "spec.resolved.yaml").read_text()
    again = run_experiment(load_experiment(text=text), out=tmp_path / "again", workers=1, progress=False)
    key = lambda r: (r["mode"], r["arm"], r["repeat"], r["round"])  # noqa: E731
    want = {key(r): r["test"] for r in _records(run_dir) if r["mode"] in ("local", "cyclic")}
    got = {key(r): r["test"] for r in _records(again) if r["mode"] in ("local", "cyclic")}
    assert got == want


def test_baseline_training_and_engine_are_planned() -> None:
    text = SPEC + (
        "baseline: {centralized: true, local: true, training: {optimizer: sgd, learning_rate: 0.1, rounds: 4, local_epochs: 1}}\n"
    )
    experiment = load_experiment(text=text)
    jobs = plan_jobs(experiment, preflight(experiment))
    by_mode = {j.mode: j for j in jobs}
    assert set(by_mode) == {"centralized", "local", "federated"}
    assert by_mode["federated"].spec.training.optimizer == "adam"
    for mode in ("centralized", "local"):
        assert by_mode[mode].spec.training.optimizer == "sgd" and by_mode[mode].spec.baseline_epochs == 4
    assert by_mode["local"].engine == SEQUENTIAL_BASELINE
    # left out of the dump while unset: a spec without them keeps its digest
    assert "local" not in load_experiment(text=SPEC).spec.model_dump()["baseline"]
