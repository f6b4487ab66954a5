"""The paper workload for benchmarks: ``specs/paper.yaml`` itself, resized by overrides.

The benchmarks import this (they run as scripts from this folder), so the paper's
model, optimizer, batch size and DP settings are written in one place, the spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAPER = Path(__file__).resolve().parents[1] / "specs" / "paper.yaml"


def paper_experiment(
    rows: int = 50_000,
    rounds: int = 1,
    epochs: int = 5,
    dp: bool = True,
    extra: Sequence[str] = (),
    plugins: Any = None,
) -> Any:
    """``specs/paper.yaml`` with ``rows`` patients per site, ``rounds`` x ``epochs``, one repeat,
    no ledger and no baseline (what a benchmark times is training); DP as the paper's unless ``dp`` is off."""
    from fedcore.spec import load_experiment

    overrides = [
        f"data.settings.patients_per_site={rows}",
        f"training.rounds={rounds}",
        f"training.local_epochs={epochs}",
        "repeats=1",
        "ledger=null",
        "baseline.centralized=false",
        *([] if dp else ["privacy=[]"]),
        *extra,
    ]
    return load_experiment(PAPER, overrides, plugins)
