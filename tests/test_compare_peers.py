"""benchmarks/compare_peers.py on a tiny workload: every arm trains the same computation.

The non-private arms (fedcore's two engines, the plain PyTorch loop, and Flower's simulation
running that loop) start from the same model and draw the same batches, so they end at the
same test accuracy; Opacus DP-SGD runs with fedcore's noise multiplier, clip and sampling
rate, so its accuracy and epsilon match fedcore's DP arm. Flower's rows need the ``bench``
extra (Ray); CI does not install it, so they run only where Ray is importable.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare_peers  # noqa: E402

TINY = ["--rows", "1000", "--epochs", "1", "--rounds", "2"]


def test_arms_compute_the_same_and_print_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "peers.json"
    arms = compare_peers.main([*TINY, "--arms", "plain", "sequential", "vectorized", "vectorized-dp", "opacus", "--json", str(out)])
    by = {a.label.split(",")[0].split(" (")[0]: a for a in arms}
    assert set(by) == {"plain PyTorch FedAvg", "fedcore sequential engine", "fedcore vectorized engine",
                       "fedcore vectorized DP-SGD", "Opacus DP-SGD"}
    plain = by["plain PyTorch FedAvg"].accuracy
    assert 0.4 < plain <= 1.0
    # Same initial model, same batches, same FedAvg: float rounding apart, the same model.
    for label in ("fedcore sequential engine", "fedcore vectorized engine"):
        assert abs(by[label].accuracy - plain) <= 0.01, (label, by[label].accuracy, plain)
    # Same DP-SGD parameters (the noise itself is secret and differs).
    assert abs(by["fedcore vectorized DP-SGD"].accuracy - by["Opacus DP-SGD"].accuracy) <= 0.15
    fedcore_epsilon = float(re.search(r"epsilon ([0-9.]+)", by["fedcore vectorized DP-SGD"].note).group(1))
    opacus_epsilon = float(re.search(r"Opacus's epsilon ([0-9.]+)", by["Opacus DP-SGD"].note).group(1))
    assert abs(fedcore_epsilon - opacus_epsilon) <= 0.02 and 0.9 <= fedcore_epsilon <= 1.0
    for arm in arms:
        assert len(arm.seconds) == 2 and all(s > 0 for s in arm.seconds)
        assert arm.per_round > 0 and len(arm.cpu_seconds) == 2
    printed = capsys.readouterr().out
    assert "| arm | cores | s/round (wall) |" in printed
    assert sum(line.startswith("| ") for line in printed.splitlines()) == 1 + len(arms)
    saved = json.loads(out.read_text())
    assert [a["label"] for a in saved["arms"]] == [a.label for a in arms]


@pytest.mark.slow
@pytest.mark.skipif(not compare_peers.ray_available(), reason="Flower's simulation engine needs the bench extra (Ray)")
def test_flower_simulation_runs_the_plain_loop() -> None:
    arms = compare_peers.main([*TINY, "--arms", "plain", "flower", "--actors", "1"])
    plain, flower = arms
    assert flower.label == "Flower simulation, 1 actor" and flower.cores == "1 (+ server)"
    # The ClientApp runs the plain loop with each site's generator kept in its context: same model.
    assert abs(flower.accuracy - plain.accuracy) <= 0.01
    assert len(flower.seconds) == 2 and len(flower.cpu_seconds) == 2 and flower.cpu_seconds[1] > 0
