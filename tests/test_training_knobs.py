"""Training knobs: ``training.local_steps`` (instead of local epochs), sweep entries that set
several paths together (an aggregator with its own client learning rate and optimizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedcore.engine.runner import preflight, run_experiment
from fedcore.engine.simulation import make_sites, initial_module
from fedcore.engine.training import weights_of
from fedcore.errors import SpecError
from fedcore.spec import build_components, load_experiment

SPEC = """
name: knobs
seed: 1
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 60, n_classes: 3}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 2, local_steps: 3, batch_size: 8}
execution: {workers: 1, progress: false, checkpoints: false}
"""


def test_local_steps_fix_the_updates_per_round_whatever_the_site_size() -> None:
    experiment = load_experiment(text=SPEC.replace("patients_per_site: 60", "site_sizes: [20, 60, 120]"))
    spec = experiment.spec
    components = build_components(spec, experiment.plugins)
    data = components.dataset.load(spec.seed)
    assert len({s.n_train for s in data.sites}) > 1  # sites of different sizes
    start = weights_of(initial_module(components, data, spec.seed))
    for steps in (3, 40):  # fewer than an epoch, and several epochs (more than any site has batches)
        spec_n = spec.model_copy(update={"training": spec.training.model_copy(update={"local_steps": steps})})
        updates = [site.fit(start, 1) for site in make_sites(spec_n, components, data, spec.seed)]
        assert [u.local_steps for u in updates] == [steps] * len(data.sites)


def test_local_steps_and_epochs_are_exclusive() -> None:
    with pytest.raises(SpecError, match="set local_epochs or local_steps, not both") as info:
        load_experiment(text=SPEC.replace("local_steps: 3", "local_steps: 3, local_epochs: 2"))
    assert "training" in str(info.value) and "\n" not in str(info.value)
    spec = load_experiment(text=SPEC).spec
    assert spec.training.local_epochs == 1 and spec.baseline_epochs == 2
    # the resolved spec (local_epochs: 1 written out) loads again
    again = load_experiment(text=yaml.safe_dump(spec.model_dump(mode="json"))).spec
    assert again.training.local_steps == 3
    assert "local_steps" not in load_experiment(text=SPEC.replace("local_steps: 3", "local_epochs: 1")).spec.model_dump()["training"]


def test_local_steps_run_sequential_and_dp_accounts_them(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    text = SPEC + "privacy: [{use: gaussian, settings: {epsilon: 5, delta: 1.0e-5}}]\nexecution: {reproducible_noise: true, workers: 1, progress: false, checkpoints: false}\n"
    text = text.replace("execution: {workers: 1, progress: false, checkpoints: false}\n", "", 1)
    experiment = load_experiment(text=text)
    choice = preflight(experiment)["main"]
    assert choice.engine == "sequential" and "local_steps" in (choice.reason or "")
    run_dir = run_experiment(experiment, out=tmp_path / "run", workers=1, progress=False)
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["privacy"][0]["steps"] for r in records] == [3, 6]  # per site: local_steps x rounds, as calibrated
    assert records[-1]["privacy"][0]["epsilon"] <= 5 + 1e-6
    assert [r["epoch"] for r in records] == [1, 2]


GROUPED = SPEC.replace("local_steps: 3", "local_epochs: 1") + """
sweep:
  aggregator+training.learning_rate+training.optimizer:
    - [{use: fedavg}, 0.01, adam]
    - [{use: fedprox, settings: {mu: 0.01}}, 0.05, sgd]
  training.batch_size: [8, 16]
"""


def test_a_sweep_entry_sets_several_paths_as_one_arm() -> None:
    experiment = load_experiment(text=GROUPED)
    assert len(experiment.arms) == 4
    first = experiment.arms[0]
    assert first.label == "aggregator=fedavg, training.learning_rate=0.01, training.optimizer=adam, training.batch_size=8"
    by_label = {a.label: a.spec for a in experiment.arms}
    fedprox = by_label["aggregator=fedprox, training.learning_rate=0.05, training.optimizer=sgd, training.batch_size=16"]
    assert fedprox.aggregator.use == "fedprox" and fedprox.training.learning_rate == 0.05
    assert fedprox.training.optimizer == "sgd" and fedprox.training.batch_size == 16


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("  aggregator+training.learning_rate: [[{use: fedavg}, 0.1], [{use: fedprox}]]\n", "sweep.aggregator+training.learning_rate.1: sweep entry"),
        ("  aggregator+training.learning_rate: [[{use: fedavg}, -1]]\n", "sweep.aggregator+training.learning_rate[0] -> training.learning_rate"),
    ],
)
def test_bad_grouped_sweep_names_the_entry(sweep: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_experiment(text=SPEC + "sweep:\n" + sweep)
    assert message in str(info.value) and "\n" not in str(info.value)
