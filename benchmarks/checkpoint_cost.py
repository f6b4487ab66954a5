"""What per-round checkpoints cost: the time spent writing parts, over the run's wall time, both engines.

Runs the spec with ``execution.checkpoints: true`` in this process and times every
call that writes checkpoint parts (the sites' parts, flushed to the disk, and the
coordinator's) inside the same run, so the ratio is immune to the machine's other load;
then the same run with checkpoints off, alternating ``--pairs`` times after one
warm-up pair, for the medians. Target: parts' time <= 5 % of the run on the small spec
(many short rounds: the worst case, a round's parts cost the same whatever its length).
Under DP each site's part is flushed to the disk (about 7 ms a file, more on a busy disk).

    .venv/bin/python benchmarks/checkpoint_cost.py
    .venv/bin/python benchmarks/checkpoint_cost.py --no-dp
    .venv/bin/python benchmarks/checkpoint_cost.py --rounds 10 --patients 5000 --pairs 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedcore.engine.runner import run_experiment
from fedcore.engine.simulation import FederatedRun
from fedcore.spec import load_experiment

SPEC = """\
name: checkpoint-cost
seed: 1
repeats: 2
data: {{use: synthetic-ehr, settings: {{sites: {sites}, patients_per_site: {patients}}}}}
model: {{use: mlp, settings: {{hidden: [32, 16]}}}}
training: {{rounds: {rounds}, local_epochs: 1, batch_size: 64}}
aggregator: {{use: fedavg}}
ledger: {{use: sqlite-chain}}
privacy: {privacy}
execution: {{progress: false, engine: {engine}, checkpoints: {checkpoints}}}
"""


DP = "[{use: gaussian, settings: {level: record, epsilon: 4.0, delta: 1.0e-5, max_grad_norm: 1.0}}]"
SPENT = [0.0]


def _timed(method: Callable[..., None]) -> Callable[..., None]:
    def wrapper(*args: object) -> None:
        started = time.perf_counter()
        try:
            method(*args)
        finally:
            SPENT[0] += time.perf_counter() - started

    return wrapper


FederatedRun.save_sites = _timed(FederatedRun.save_sites)  # type: ignore[method-assign]
FederatedRun.save_checkpoint = _timed(FederatedRun.save_checkpoint)  # type: ignore[method-assign]


def one(args: argparse.Namespace, engine: str, checkpoints: bool, out: Path) -> tuple[float, float]:
    """Wall seconds of the run, and of its checkpoint writes."""
    privacy = "[]" if args.no_dp else DP
    text = SPEC.format(
        sites=args.sites, patients=args.patients, rounds=args.rounds, engine=engine, checkpoints=str(checkpoints).lower(), privacy=privacy
    )
    experiment = load_experiment(None, (), text=text)
    SPENT[0] = 0.0
    started = time.perf_counter()
    run_experiment(experiment, out=out, workers=1, progress=False)
    return time.perf_counter() - started, SPENT[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-dp", action="store_true", help="no DP-SGD: site parts hold no accountant and are not flushed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedcore-ckpt-") as tmp:
        dp = "no DP" if args.no_dp else "DP-SGD"
        print(f"{args.sites} sites x {args.patients} patients, {args.rounds} rounds, 2 repeats, {dp}, sqlite-chain ledger")
        print("| engine | off (s, median) | on (s, median) | checkpoint writes / run (same runs) | parts kept |")
        print("|---|---|---|---|---|")
        for engine in ("sequential", "vectorized"):
            times: dict[bool, list[float]] = {False: [], True: []}
            shares: list[float] = []
            parts = 0
            for pair in range(args.pairs + 1):
                for checkpoints in (False, True):
                    out = Path(tmp) / f"{engine}-{pair}-{checkpoints}"
                    seconds, writing = one(args, engine, checkpoints, out)
                    if pair:
                        times[checkpoints].append(seconds)
                        if checkpoints:
                            shares.append(writing / seconds)
                    if checkpoints:
                        parts = len(list(out.rglob("round-*.pt")))
            off, on = statistics.median(times[False]), statistics.median(times[True])
            print(f"| {engine} | {off:.2f} | {on:.2f} | {100 * statistics.median(shares):.1f} % | {parts} |")


if __name__ == "__main__":
    main()
