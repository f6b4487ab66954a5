"""Default worker count against --workers 1 and --workers N, on a small study and the paper's workload.

The default (no --workers) must never be more than 10 % slower than --workers 1.
Each configuration is a real `fedcore run` process (process start, data, training,
report), timed by wall clock, in one run of this script:

    .venv/bin/python benchmarks/workers.py                      # small study + paper workload
    .venv/bin/python benchmarks/workers.py --paper-set training.rounds=2 --paper-set repeats=2

It prints seconds per configuration (best of interleaved trials) and the ratio default / workers=1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEDCORE = str(Path(sys.executable).with_name("fedcore"))

SMALL = """\
name: small
seed: 3
repeats: 3
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 400}}
model: {use: mlp, settings: {hidden: [16]}}
training: {rounds: 3, local_epochs: 1, batch_size: 32}
baseline: {centralized: true}
execution: {progress: false}
"""


def timed_run(spec: Path, sets: list[str], workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [FEDCORE, "run", str(spec), "--out", f"{tmp}/run", "--no-progress"]
        for item in sets:
            args += ["--set", item]
        if workers is not None:
            args += ["--workers", str(workers)]
        started = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, cwd=REPO)
        return time.perf_counter() - started


def compare(label: str, spec: Path, sets: list[str], cores: int, trials: int) -> None:
    from fedcore.engine.runner import default_workers, execution_units, plan_jobs, preflight, unit_cost_model
    from fedcore.spec import load_experiment

    experiment = load_experiment(spec, sets)
    jobs = plan_jobs(experiment, preflight(experiment))
    chosen = default_workers(experiment, execution_units(jobs, cores, unit_cost_model(experiment)))
    # Interleaved trials, best of each: a shared machine's load hits every configuration alike.
    times: dict[int | None, list[float]] = {1: [], cores: [], None: []}
    for _ in range(trials):
        for workers in times:
            times[workers].append(timed_run(spec, sets, workers))
    one, many, default = (min(times[w]) for w in (1, cores, None))
    print(
        f"{label}: {len(jobs)} trainings; default chose {chosen} worker(s). "
        f"workers=1 {one:.1f} s, workers={cores} {many:.1f} s, default {default:.1f} s; "
        f"default/workers=1 = {default / one:.2f}, workers={cores}/workers=1 = {many / one:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-set", action="append", default=[], metavar="PATH=VALUE", help="shrink the paper run")
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--trials", type=int, default=3, help="interleaved runs of each configuration (best counts)")
    parser.add_argument("--paper-trials", type=int, default=1)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.yaml"
        small.write_text(SMALL)
        compare("small study", small, [], cores, args.trials)
    if not args.skip_paper:
        compare("paper workload" + (f" ({', '.join(args.paper_set)})" if args.paper_set else ""),
                REPO / "specs" / "paper.yaml", args.paper_set, cores, args.paper_trials)


if __name__ == "__main__":
    main()
