"""The plugin API is documented: every hook has a docstring with a :param: per argument."""

from __future__ import annotations

import inspect
import re

from fedcore import hookspecs
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _hooks():
    return [
        (name, fn)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("fedcore_") and hasattr(fn, "fedcore_spec")
    ]


def test_every_hook_is_a_spec_with_prefix() -> None:
    names = [n for n, _ in _hooks()]
    assert set(hookspecs.REGISTRATION_HOOKS) <= set(names)
    assert {"fedcore_run_start", "fedcore_round_end", "fedcore_run_end"} <= set(names)


def test_every_hook_has_a_docstring_and_param_lines() -> None:
    for name, fn in _hooks():
        doc = inspect.getdoc(fn)
        assert doc and doc.strip(), f"{name} has no docstring"
        params = list(inspect.signature(fn).parameters)
        for param in params:
            assert re.search(rf"^:param {param}:", doc, re.M), f"{name} lacks ':param {param}:'"
        documented = re.findall(r"^:param (\w+):", doc, re.M)
        assert set(documented) <= set(params), f"{name} documents unknown parameters {set(documented) - set(params)}"


def test_plugin_guide_documents_every_hook() -> None:
    guide = (REPO / "docs" / "plugins.md").read_text()
    for name, fn in _hooks():
        assert f"`{name}(" in guide, f"docs/plugins.md lacks the hook {name}"
        for param in inspect.signature(fn).parameters:
            assert f"`{param}`" in guide, f"docs/plugins.md does not describe {name}'s parameter {param}"


def test_reference_components_follow_the_contract() -> None:
    from fedcore.registry import PluginManager
    from fedcore.testing import check_component

    manager = PluginManager()
    assert not manager.failures, [f.describe() for f in manager.failures]
    for entry in manager.entries():
        check_component(entry.cls)
