"""Spec loading: defaults, overrides, sweeps, and one-line errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import TINY_SPEC
from fedcore.errors import SpecError
from fedcore.spec import load_experiment


def test_defaults_are_filled_and_settings_resolved() -> None:
    experiment = load_experiment(text=TINY_SPEC)
    spec = experiment.spec
    assert spec.aggregator.settings == {"server_learning_rate": 1.0}
    assert spec.model.settings["hidden"] == [16]
    assert spec.model.settings["activation"] == "relu"
    assert spec.training.optimizer == "adam" and spec.training.learning_rate == 0.001
    assert spec.baseline_epochs == 2


def test_overrides_with_list_indexes() -> None:
    text = TINY_SPEC + "attacks: []\n"
    experiment = load_experiment(
        text=text, overrides=["training.rounds=4", "model.settings.hidden.0=8", "seed=11"]
    )
    assert experiment.spec.training.rounds == 4
    assert experiment.spec.model.settings["hidden"] == [8]
    assert experiment.spec.seed == 11


def test_sweep_expands_with_whole_plugin_references() -> None:
    text = TINY_SPEC + (
        "sweep:\n"
        "  aggregator: [{use: fedavg}, {use: fedavg, settings: {server_learning_rate: 0.5}}]\n"
        "  training.learning_rate: [0.001, 0.01]\n"
    )
    experiment = load_experiment(text=text)
    assert len(experiment.arms) == 4
    lrs = {(a.spec.aggregator.settings["server_learning_rate"], a.spec.training.learning_rate) for a in experiment.arms}
    assert lrs == {(1.0, 0.001), (1.0, 0.01), (0.5, 0.001), (0.5, 0.01)}
    assert all(a.spec.sweep == {} for a in experiment.arms)
    assert experiment.arms[2].label == "aggregator=fedavg(server_learning_rate=0.5), training.learning_rate=0.001"
    assert experiment.arms[0].label == "aggregator=fedavg, training.learning_rate=0.001"


def test_arm_labels_show_only_what_differs_between_plugin_references() -> None:
    text = TINY_SPEC + (
        "sweep:\n"
        "  aggregator:\n"
        "    - {use: fedavg, settings: {server_learning_rate: 1.0}}\n"
        "    - {use: fedavg, settings: {server_learning_rate: 0.5}}\n"
    )
    labels = [arm.label for arm in load_experiment(text=text).arms]
    assert labels == ["aggregator=fedavg(server_learning_rate=1.0)", "aggregator=fedavg(server_learning_rate=0.5)"]


BAD_SPECS = {
    "unknown plugin": (TINY_SPEC.replace("use: fedavg", "use: fedavgg"), ["aggregator.use", "did you mean 'fedavg'"]),
    "unknown key": (TINY_SPEC + "trainig: {rounds: 2}\n", ["trainig", "unknown key", "valid keys"]),
    "unknown nested key": (TINY_SPEC.replace("batch_size: 32", "batch_sise: 32"), ["training.batch_sise", "tiny.yaml:6:"]),
    "wrong type": (TINY_SPEC.replace("rounds: 2", "rounds: many"), ["training.rounds", "integer"]),
    "bad settings": (
        TINY_SPEC.replace("{use: fedavg}", "{use: fedavg, settings: {server_learning_rate: -1}}"),
        ["aggregator.settings.server_learning_rate", "greater than 0"],
    ),
    "unknown setting": (
        TINY_SPEC.replace("{use: fedavg}", "{use: fedavg, settings: {mu: 0.1}}"),
        ["aggregator.settings.mu", "unknown key"],
    ),
    "malformed yaml": ("name: tiny\ndata: {use: synthetic-ehr\n", ["malformed YAML", "tiny.yaml:"]),
    "not a mapping": ("- just\n- a list\n", ["must be a YAML mapping"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_gives_one_line_and_exit_2(case: str, tmp_path: Path, run_cli) -> None:
    text, needles = BAD_SPECS[case]
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    for command in ("validate", "run"):
        result = run_cli(command, str(path), "--out", str(tmp_path / "out")) if command == "run" else run_cli(command, str(path))
        assert result.returncode == 2, (case, command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr
        for needle in needles:
            assert needle in lines[0], (case, lines[0])
        assert not (tmp_path / "out").exists(), "nothing may be written for a bad spec"


def test_missing_spec_file(run_cli, tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "spec file not found" in result.stderr and "nope.yaml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_override_path(tiny_spec: Path, run_cli) -> None:
    result = run_cli("validate", str(tiny_spec), "--set", "training.rounds")
    assert result.returncode == 2 and "has no '='" in result.stderr


def test_secure_aggregation_refuses_individual_update_aggregators() -> None:
    from typing import ClassVar

    from fedcore import hookimpl
    from fedcore.components import Aggregator, SecureAggregator
    from fedcore.registry import PluginManager

    class NeedsEach(Aggregator):
        """Needs individual updates."""

        name: ClassVar[str] = "needs-each"
        needs_individual_updates: ClassVar[bool] = True

    class SumOnly(SecureAggregator):
        """Reveals sums."""

        name: ClassVar[str] = "sum-only"

    class Local:
        @hookimpl
        def fedcore_aggregators(self):
            return [NeedsEach]

        @hookimpl
        def fedcore_secure_aggregators(self):
            return [SumOnly]

    plugins = PluginManager(extra_plugins=[Local()])
    text = TINY_SPEC.replace("{use: fedavg}", "{use: needs-each}") + "secure_aggregation: {use: sum-only}\n"
    with pytest.raises(SpecError) as err:
        load_experiment(text=text, plugins=plugins)
    assert "needs-each" in str(err.value) and "sum-only" in str(err.value)


def test_resolved_spec_is_complete_yaml(tiny_spec: Path) -> None:
    from fedcore.spec import ExperimentSpec, resolved_yaml

    experiment = load_experiment(tiny_spec)
    reloaded = ExperimentSpec.model_validate(yaml.safe_load(resolved_yaml(experiment.spec)))
    assert reloaded == experiment.spec


def test_forcing_the_vectorized_engine_on_a_spec_it_cannot_run_is_a_user_error(tiny_spec: Path, run_cli, tmp_path: Path) -> None:
    result = run_cli(
        "run", str(tiny_spec), "--set", "execution.engine=vectorized", "--set", "aggregator.use=fedprox",
        "--out", str(tmp_path / "out"),
    )
    assert result.returncode == 2, result.stderr
    assert "execution.engine" in result.stderr and "vectorized engine cannot run this spec" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_a_user_error(tiny_spec: Path, run_cli, tmp_path: Path) -> None:
    result = run_cli("run", str(tiny_spec), "--set", "execution.device=cuda", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no CUDA device" in result.stderr
