"""The wheel carries every package and data file, under the import names DESIGN.md promises."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_core_plugins_and_data_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("fedcore-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected_packages = {
        "fedcore/" + str(init.relative_to(REPO / "core")) for init in (REPO / "core").rglob("__init__.py")
    } | {
        "fedcore/plugins/" + str(init.relative_to(REPO / "plugins"))
        for init in (REPO / "plugins").rglob("__init__.py")
        if "node_modules" not in init.parts
    }
    assert expected_packages <= names, sorted(expected_packages - names)
    assert "fedcore/hookspecs.py" in names and "fedcore/registry.py" in names
    assert "fedcore/plugins/ledgers/fabric/chaincode/lib/audit-ledger.js" in names
    assert "fedcore/plugins/ledgers/fabric/chaincode/package-lock.json" in names
    assert not any(n.startswith(("core/", "plugins/", "tests/", "benchmarks/", "examples/")) for n in names)
    assert not any("node_modules" in n for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[fedcore]" in text and "fedcore.plugins.aggregators" in text
