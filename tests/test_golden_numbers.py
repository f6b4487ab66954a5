"""Golden numbers: every bundled spec, shrunk, on both engines, gives the numbers pinned here.

A refactoring guard. Each spec of ``specs/`` is shrunk (a few dozen rows per site, a tiny
MLP, one or two rounds, one repeat, DP noise in the reproducible research mode) and run
through the whole pipeline (:func:`fedcore.engine.runner.run_experiment`) once with
``execution.engine: sequential`` and once with ``auto`` (vectorized wherever the
vectorized engine runs the arm). The metrics of every round written to ``rounds.jsonl``
must equal ``tests/golden_numbers.json`` to float rounding (relative 1e-6).

Left out: the epsilon sweep's arms other than no DP and epsilon 1 (calibrating a noise
multiplier costs seconds per epsilon, and every arm runs the same code); CrypTen secure aggregation (its parties take tens of seconds to start; its
sum is checked against the plain sum in ``test_secagg_end_to_end.py``), so the arms
that sweep it run with ``secure_aggregation: null``.

Regenerate (only when a change of the numbers is intended and explained in the commit):
``FEDCORE_GOLDEN_UPDATE=1 .venv/bin/pytest tests/test_golden_numbers.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedcore.engine.runner import run_experiment
from fedcore.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden_numbers.json")
#: the real data set, in a ``shared/data`` folder beside the checkout (or beside its worktree folder)
DIABETES = next(
    (
        found
        for base in REPO.parents
        if (found := base / "shared" / "data" / "diabetes-130-us-hospitals" / "diabetic_data.csv.gz").is_file()
    ),
    REPO.parent / "shared" / "data" / "diabetes-130-us-hospitals" / "diabetic_data.csv.gz",
)
UPDATE = os.environ.get("FEDCORE_GOLDEN_UPDATE") == "1"
ENGINES = ("sequential", "auto")
RTOL = 1e-6


def shrunk(path: Path, engine: str) -> dict[str, Any]:
    """The spec at ``path`` at tiny sizes, run by ``engine``."""
    raw = yaml.safe_load(path.read_text())
    raw["repeats"] = 1
    raw["training"] = {**raw.get("training", {}), "rounds": 2, "local_epochs": 1}
    raw["model"] = {**raw.get("model", {"use": "mlp"})}
    raw["model"]["settings"] = {**raw["model"].get("settings", {}), "hidden": [8]}
    settings = raw["data"].setdefault("settings", {})
    if raw["data"]["use"] == "synthetic-ehr":
        settings["patients_per_site"] = 60
        raw["training"]["batch_size"] = 16
    else:  # the real data set: every row, one round, big batches, no oversampled arm
        settings["path"] = str(DIABETES)
        raw["training"].update(rounds=1, batch_size=4096)
        raw["sweep"] = {k: v[:1] for k, v in raw.get("sweep", {}).items()}
    if path.stem == "paper-epsilon-sweep":  # no DP and the paper's epsilon (calibrating each costs seconds)
        raw["sweep"]["privacy"] = [raw["sweep"]["privacy"][0], raw["sweep"]["privacy"][3]]
    if raw.get("baseline", {}).get("centralized"):
        raw["baseline"] = {"centralized": True, "epochs": 2}
    raw["secure_aggregation"] = None
    if "secure_aggregation" in raw.get("sweep", {}):
        raw["sweep"]["secure_aggregation"] = [None]
    raw["execution"] = {
        "engine": engine,
        "workers": 1,
        "progress": False,
        "checkpoints": False,
        "reproducible_noise": True,
    }
    return raw


def numbers(run_dir: Path) -> dict[str, Any]:
    """What is pinned of a run: every round's metrics and privacy spent, by mode, arm, repeat."""
    out: dict[str, Any] = {}
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = f"{r['mode']}|{r['arm']}|{r['repeat']}|{r['round']}"
        out[key] = {
            "train_loss": r["train_loss"],
            "validation": [r["validation"][m] for m in ("loss", "accuracy", "f1")],
            "test": [r["test"][m] for m in ("loss", "accuracy", "precision", "recall", "f1")],
            "per_site_test_loss": [s["test"]["loss"] for s in r["per_site"]],
            "update_bytes": r["update_bytes"],
            "epsilon": [p["epsilon"] for p in r["privacy"]],
        }
    summary = json.loads((run_dir / "summary.json").read_text())
    for arm in summary["arms"]:
        out[f"stopped|{arm['label']}"] = [run.get("stopped_reason") for run in arm["federated"]["runs"]]
    return dict(sorted(out.items()))


def close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-9)
    return a == b


SPECS = [
    # the real data set is read whole (about 20 s): an end-to-end test of its own
    pytest.param(p, marks=pytest.mark.slow) if p.stem == "diabetes130" else p
    for p in sorted((REPO / "specs").glob("*.yaml"))
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_golden_numbers(path: Path, engine: str, tmp_path: Path) -> None:
    if path.stem == "diabetes130" and not DIABETES.exists():
        pytest.skip("the Diabetes 130-US hospitals file is not here")
    if path.stem == "paper-fabric":
        pytest.skip("paper.yaml with its ledger on a live Fabric network (test_fabric_network.py): the numbers are paper's")
    if path.stem == "diabetes130" and engine == "auto":
        pytest.skip("the model uses dropout: auto runs the sequential engine, pinned by the sequential case")
    torch.set_num_threads(1)
    experiment = load_experiment(text=yaml.safe_dump(shrunk(path, engine)))
    got = numbers(run_experiment(experiment, out=tmp_path / "run", workers=1, progress=False))
    key = f"{path.stem}|{engine}"
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if UPDATE:
        golden[key] = got
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
        return
    assert key in golden, f"no golden numbers for {key}: run with FEDCORE_GOLDEN_UPDATE=1"
    want = golden[key]
    assert got.keys() == want.keys()
    bad = [k for k in want if not close(got[k], want[k])]
    assert not bad, f"{len(bad)} records changed, first {bad[0]}: {got[bad[0]]} != {want[bad[0]]}"
