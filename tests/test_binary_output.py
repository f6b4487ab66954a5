"""``model.settings.binary_output: sigmoid``: one output unit for a two-class task, trained and
evaluated like any model on both engines (its loss is binary cross-entropy with logits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedcore.engine.runner import run_experiment
from fedcore.errors import SpecError
from fedcore.plugins.models import MLP, MLPSettings
from fedcore.spec import load_experiment

SPEC = """
name: sigmoid
seed: 4
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 60, n_classes: 2}}
model: {use: mlp, settings: {hidden: [8], binary_output: sigmoid}}
training: {rounds: 2, local_epochs: 1, batch_size: 16}
evaluation: {metrics: [auroc, accuracy], primary: auroc}
privacy: [{use: gaussian, settings: {epsilon: 5, delta: 1.0e-5}}]
execution: {workers: 1, progress: false, checkpoints: false, reproducible_noise: true}
"""


def test_one_output_unit_and_binary_cross_entropy() -> None:
    module = MLP(MLPSettings(hidden=[4], binary_output="sigmoid")).build(3, 2)
    assert module[-2].out_features == 1
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    with torch.no_grad():
        logits = module(x)
    assert logits.shape == (20, 2) and torch.all(logits[:, 0] == 0)
    assert float(F.cross_entropy(logits, y)) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits[:, 1], y.float())), rel=1e-5)
    with pytest.raises(SpecError, match="needs a two-class task; the data has 3 classes"):
        MLP(MLPSettings(binary_output="sigmoid")).build(3, 3)


def test_sigmoid_output_trains_the_same_on_both_engines(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    got = {}
    for engine in ("sequential", "vectorized"):
        run_dir = run_experiment(
            load_experiment(text=SPEC, overrides=[f"execution.engine={engine}"]), out=tmp_path / engine, workers=1, progress=False
        )
        got[engine] = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for seq, vec in zip(got["sequential"], got["vectorized"], strict=True):
        assert seq["test"]["loss"] == pytest.approx(vec["test"]["loss"], rel=1e-5)
        assert seq["test"]["scores"]["auroc"] == pytest.approx(vec["test"]["scores"]["auroc"], rel=1e-5)
        assert seq["privacy"][0]["epsilon"] == pytest.approx(vec["privacy"][0]["epsilon"])
    assert got["sequential"][-1]["test"]["scores"]["auroc"] is not None
