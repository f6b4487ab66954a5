"""What audits cost, relative to the training they audit; prints two tables, every ratio from one run.

1. **Per audit**, on the paper workload (specs/paper.yaml: 3 sites x 50,000 patients, MLP
   128-64-32, 10 rounds x 5 local epochs, record-level DP-SGD at epsilon = 1; one repeat):
   the wall time of each audit of one (arm, repeat) over the wall time of its training.
   Targets: ``membership-loss`` <= 5 %; ``membership-lira`` with 16 shadow runs <= 2x.
2. **The epsilon sweep** (specs/paper-epsilon-sweep.yaml with its audits) against the same
   sweep with ``audits: []``, run one after the other in this process (one worker).
   Target: <= 1.5x. ``--sweep-shrink`` runs the spec's quick look (5,000 patients, 3 rounds,
   1 local epoch, 2 repeats) when the full sweep is too long for the machine.

    .venv/bin/python benchmarks/audit_cost.py                     # both, full size (long)
    .venv/bin/python benchmarks/audit_cost.py --sweep-shrink      # the sweep shrunk
    .venv/bin/python benchmarks/audit_cost.py --patients 10000 --rounds 2 --local-epochs 1 --skip-sweep
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedcore.engine.runner import run_experiment
from fedcore.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]
SHRINK = ["repeats=2", "training.rounds=3", "training.local_epochs=1", "data.settings.patients_per_site=5000"]


def per_audit(args: argparse.Namespace, out: Path) -> None:
    overrides = [
        "repeats=1",
        "baseline.centralized=false",
        "ledger=null",
        f"data.settings.patients_per_site={args.patients}",
        f"training.rounds={args.rounds}",
        f"training.local_epochs={args.local_epochs}",
        "audits=[{use: membership-loss}, {use: membership-lira, settings: {shadows: %d}}, {use: epsilon-lower-bound}]"
        % args.shadows,
    ]
    experiment = load_experiment(REPO / "specs" / "paper.yaml", overrides)
    run_dir = run_experiment(experiment, out=out / "per-audit", workers=1, progress=False)
    run = json.loads((run_dir / "summary.json").read_text())["arms"][0]["federated"]["runs"][0]
    training = run["wall_seconds"]
    print(f"\nPer audit, paper workload ({args.patients} patients per site, {args.rounds} rounds x "
          f"{args.local_epochs} local epochs, DP-SGD epsilon = 1): training {training:.1f} s wall")  # fmt: skip
    print("| audit | seconds | x training | target |")
    print("|---|---:|---:|---|")
    targets = {"membership-loss": "<= 0.05x", "membership-lira": "<= 2x"}
    for audit in run["audits"]:
        name = audit["audit"] + (f" ({args.shadows} shadows)" if audit["audit"] == "membership-lira" else "")
        ratio = audit["seconds"] / training
        print(f"| {name} | {audit['seconds']:.2f} | {ratio:.3f} | {targets.get(audit['audit'], '-')} |")


def sweep(args: argparse.Namespace, out: Path) -> None:
    spec = REPO / "specs" / "paper-epsilon-sweep.yaml"
    shrink = SHRINK if args.sweep_shrink else []
    timings: dict[str, list[tuple[float, float]]] = {"without audits": [], "with audits": []}
    for trial in range(args.trials):
        for label, extra in (("without audits", ["audits=[]"]), ("with audits", [])):
            experiment = load_experiment(spec, [*shrink, *extra, "ledger=null"])
            wall, cpu = time.perf_counter(), time.process_time()
            run_experiment(experiment, out=out / f"sweep-{trial}-{label.replace(' ', '-')}", workers=1, progress=False)
            timings[label].append((time.perf_counter() - wall, time.process_time() - cpu))
    size = "shrunk (" + ", ".join(SHRINK) + ")" if args.sweep_shrink else "full"
    print(f"\nEpsilon sweep, {size}, one worker, {args.trials} alternating trial(s):")
    print("| sweep | wall s | CPU s |")
    print("|---|---:|---:|")
    for label, values in timings.items():
        print(f"| {label} | {sum(v[0] for v in values):.1f} | {sum(v[1] for v in values):.1f} |")
    base, audited = timings["without audits"], timings["with audits"]
    print(f"with / without: wall {sum(v[0] for v in audited) / sum(v[0] for v in base):.3f}x, "
          f"CPU {sum(v[1] for v in audited) / sum(v[1] for v in base):.3f}x (target <= 1.5x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=50_000, help="per site, per-audit table")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--shadows", type=int, default=16)
    parser.add_argument("--skip-per-audit", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--sweep-shrink", action="store_true", help="the spec's quick look instead of the full sweep")
    parser.add_argument("--trials", type=int, default=1, help="alternating sweep pairs (without, with)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_per_audit:
            per_audit(args, Path(tmp))
        if not args.skip_sweep:
            sweep(args, Path(tmp))


if __name__ == "__main__":
    main()
