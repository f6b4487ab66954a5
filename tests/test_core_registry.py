"""Plugin discovery: entry points only, clear errors, blocking, conflicts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fedcore.errors import PluginError
from fedcore.registry import PluginManager


def _make_dist(root: Path, dist: str, version: str, module: str, source: str | None) -> None:
    """A real installed distribution on sys.path: dist-info metadata, entry point, module."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[fedcore]\n{module} = {module}\n")
    if source is not None:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_reference_plugins_are_found_through_entry_points() -> None:
    manager = PluginManager()
    assert "fedavg" in manager.names("aggregator")
    assert "mlp" in manager.names("model")
    entry = manager.components["aggregator"]["fedavg"]
    assert entry.distribution == "fedcore"
    assert entry.version != "?"


def test_core_does_not_import_plugins() -> None:
    core = Path(__file__).resolve().parents[1] / "core"
    for path in core.rglob("*.py"):
        text = path.read_text()
        assert "import fedcore.plugins" not in text and "from fedcore.plugins" not in text, path


def test_unknown_name_lists_choices_and_closest_match() -> None:
    manager = PluginManager()
    with pytest.raises(PluginError) as err:
        manager.get("aggregator", "fedavgg", where="spec.yaml:3: aggregator.use")
    message = str(err.value)
    assert "unknown aggregator 'fedavgg'" in message
    assert "did you mean 'fedavg'" in message
    assert "fedavg" in message.split("available aggregators:")[1]
    assert "\n" not in message


def test_failed_import_is_named_with_distribution_and_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_dist(tmp_path, "broken-fedcore-plugin", "9.8.7", "broken_fedcore_plugin", "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager()
    failure = next(f for f in manager.failures if f.plugin == "broken_fedcore_plugin")
    assert failure.distribution == "broken-fedcore-plugin" and failure.version == "9.8.7"
    assert "needs libfoo" in failure.error
    with pytest.raises(PluginError) as err:
        manager.get("aggregator", "nope", where="aggregator.use")
    assert "broken-fedcore-plugin 9.8.7 failed to load" in str(err.value)


DUPLICATE = """
from typing import ClassVar
from fedcore import hookimpl
from fedcore.components import Aggregator

class Impostor(Aggregator):
    \"\"\"Same name as the reference FedAvg.\"\"\"
    name: ClassVar[str] = "fedavg"

@hookimpl
def fedcore_aggregators():
    return [Impostor]
"""


def test_two_plugins_with_one_name_is_an_error_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_dist(tmp_path, "impostor-plugin", "1.0.0", "impostor_fedcore_plugin", DUPLICATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager()
    with pytest.raises(PluginError) as err:
        manager.get("aggregator", "fedavg", where="aggregator.use")
    message = str(err.value)
    assert "more than one plugin" in message
    assert "fedcore 0.1.0" in message and "impostor-plugin 1.0.0" in message


def test_disable_env_blocks_plugins_and_components(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCORE_DISABLE_PLUGINS", "models, fedavg")
    manager = PluginManager()
    assert manager.names("model") == []
    assert "fedavg" not in manager.names("aggregator")
    with pytest.raises(PluginError) as err:
        manager.get("aggregator", "fedavg", where="aggregator.use")
    assert "blocked by FEDCORE_DISABLE_PLUGINS" in str(err.value)


def test_resolution_does_not_depend_on_registration_order() -> None:
    import fedcore.plugins.aggregators as aggs
    import fedcore.plugins.models as models

    a = PluginManager(use_entry_points=False, extra_plugins=[aggs, models])
    b = PluginManager(use_entry_points=False, extra_plugins=[models, aggs])
    assert [e.name for e in a.entries()] == [e.name for e in b.entries()]


def test_plugins_command_lists_a_table(run_cli) -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    import json

    rows = json.loads(result.stdout)
    assert {"kind": "aggregator", "name": "fedavg"}.items() <= next(r for r in rows if r["name"] == "fedavg").items()
    assert all(set(r) == {"kind", "name", "distribution", "version", "status"} for r in rows)


MISSPELLED = """
from typing import ClassVar
from fedcore import hookimpl
from fedcore.components import Aggregator

class Lonely(Aggregator):
    \"\"\"Registered through a hook name with a typo: it would never be found.\"\"\"
    name: ClassVar[str] = "lonely"

@hookimpl
def fedcore_aggregator():
    return [Lonely]
"""


def test_a_misspelled_hook_is_a_failure_row_naming_the_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli
) -> None:
    _make_dist(tmp_path, "typo-fedcore-plugin", "0.3.0", "typo_fedcore_plugin", MISSPELLED)
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager()
    failure = next(f for f in manager.failures if f.plugin == "typo_fedcore_plugin")
    assert failure.distribution == "typo-fedcore-plugin" and failure.version == "0.3.0"
    assert "'fedcore_aggregator'" in failure.error and "fedcore_aggregators" in failure.error
    assert "fedavg" in manager.names("aggregator")  # the other plugins still load
    import json

    result = run_cli("plugins", "--json")
    rows = [r for r in json.loads(result.stdout) if r["name"] == "typo_fedcore_plugin"]
    assert rows and "fedcore_aggregator" in rows[0]["status"]


def test_disable_env_blocks_a_distribution_and_reports_its_components_as_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCORE_DISABLE_PLUGINS", "FedCore")  # a distribution name, compared as pip does
    manager = PluginManager()
    assert manager.entries() == [] and "models" in manager.blocked
    with pytest.raises(PluginError) as err:
        manager.get("model", "mlp", where="model.use")
    message = str(err.value)
    assert "model 'mlp' is not available: FEDCORE_DISABLE_PLUGINS blocks the plugin(s)" in message
    assert "'models' from fedcore 0.1.0" in message and "\n" not in message
    monkeypatch.setenv("FEDCORE_DISABLE_PLUGINS", "models")  # one entry point: a typo elsewhere still gets its hint
    with pytest.raises(PluginError, match="did you mean 'fedavg'.*blocked by FEDCORE_DISABLE_PLUGINS: 'models'"):
        PluginManager().get("aggregator", "fedavgg", where="aggregator.use")
