"""Issue 19's first target in one run: the whole ``specs/paper.yaml`` against plain PyTorch FedAvg rounds.

    .venv/bin/python benchmarks/paper_run.py                 # the paper spec as shipped
    .venv/bin/python benchmarks/paper_run.py --set repeats=2 # a smaller check

Measures, in this order and on the same machine minutes apart: one round of the paper
workload written as plain PyTorch (3 sites x 40,000 training rows, 5 local epochs, fused
Adam, one thread; ``engine_speed.plain_round``), then ``/usr/bin/time -v fedcore run
specs/paper.yaml`` (wall, CPU, peak RSS), then the plain round again. Prints the paper
run's wall time in plain rounds (the target: <= 15) against the faster of the two plain
rounds, and Table I (federated and centralized test accuracy, mean +- sd over repeats,
epsilon), so that no speed is bought with different numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from engine_speed import experiment, load, plain_round
from paper_spec import PAPER

FEDCORE = Path(sys.executable).with_name("fedcore")
TARGET_ROUNDS = 15


def timed_paper_run(overrides: list[str], out: Path) -> dict[str, float]:
    """``/usr/bin/time -v fedcore run specs/paper.yaml``: wall and CPU seconds, peak RSS in GB."""
    args = ["/usr/bin/time", "-v", str(FEDCORE), "run", str(PAPER), "--no-progress", "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fedcore run failed ({done.returncode}):\n{done.stderr[-3000:]}")

    def field(name: str) -> str:
        found = re.search(rf"^\s*{re.escape(name)}: (.+)$", done.stderr, re.MULTILINE)
        if found is None:
            raise SystemExit(f"/usr/bin/time printed no '{name}'")
        return found.group(1).strip()

    clock = [float(part) for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60**power for power, value in enumerate(reversed(clock)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": int(field("Maximum resident set size (kbytes)")) * 1024 / 1e9}


def table_one(run_dir: Path) -> dict[str, str]:
    """Test accuracy (mean +- sd over repeats) of each mode, and the largest epsilon, from ``summary.json``."""
    arm = json.loads((run_dir / "summary.json").read_text())["arms"][0]
    found = {}
    for mode in ("federated", "centralized"):
        runs = (arm.get(mode) or {}).get("runs") or []
        if runs:
            accuracy = torch.tensor([r["test"]["accuracy"] for r in runs], dtype=torch.float64) * 100
            sd = float(accuracy.std()) if len(runs) > 1 else 0.0
            found[mode] = f"{float(accuracy.mean()):.2f} +- {sd:.2f} % ({len(runs)} repeats)"
    epsilon = (arm.get("federated") or {}).get("aggregate", {}).get("epsilon_max")
    found["epsilon"] = "none" if epsilon is None else f"{epsilon:.4f}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="a spec override for the paper run, as fedcore run --set")
    parser.add_argument("--json", type=Path, help="write the figures here as well")
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = experiment(dp=False)
    seed = exp.spec.seed
    data = load(exp, seed)
    plain = [plain_round(exp, data, seed).wall]
    print(f"plain PyTorch round (paper workload, 5 local epochs): {plain[0]:.2f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paper = timed_paper_run(args.set, Path(tmp) / "run")
        table = table_one(Path(tmp) / "run")
    print(f"fedcore run specs/paper.yaml {' '.join(args.set)}: {paper['wall_s']:.1f} s wall, {paper['cpu_s']:.0f} CPU s, "
          f"peak RSS {paper['peak_rss_gb']:.2f} GB", flush=True)
    plain.append(plain_round(exp, data, seed).wall)
    print(f"plain PyTorch round again: {plain[1]:.2f} s")
    rounds = paper["wall_s"] / min(plain)
    print(f"Table I: federated {table.get('federated')}, centralized {table.get('centralized')}, epsilon {table['epsilon']}")
    print(f"paper run = {rounds:.1f} plain rounds (target <= {TARGET_ROUNDS}: {'met' if rounds <= TARGET_ROUNDS else 'not met'})")
    if args.json:
        args.json.write_text(json.dumps({**paper, "plain_round_s": plain, "plain_rounds": rounds, "table_one": table}, indent=1))


if __name__ == "__main__":
    main()
