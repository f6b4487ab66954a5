"""What audits cost, relative to the training they audit; prints two tables, every ratio from one run.

1. **Per audit**, on the paper workload (specs/paper.yaml: 3 sites x 50,000 patients, MLP
   128-64-32, 10 rounds x 5 local epochs, record-level DP-SGD at epsilon = 1; one repeat):
   the wall time of each audit of one (arm, repeat) over the wall time of its training.
   Targets: ``membership-loss`` <= 5 %; ``membership-lira`` with 16 shadow runs <= 2x.
2. **The epsilon sweep** (specs/paper-epsilon-sweep.yaml with its audits) against the same
   sweep with ``audits: []``, each a fresh ``fedcore run`` process, alternating.
   Target: <= 1.5x. ``--sweep-shrink`` runs the spec's quick look (5,000 patients, 3 rounds,
   1 local epoch, 2 repeats) when the full sweep is too long for the machine.

    .venv/bin/python benchmarks/audit_cost.py                     # both, full size (long)
    .venv/bin/python benchmarks/audit_cost.py --sweep-shrink      # the sweep shrunk
    .venv/bin/python benchmarks/audit_cost.py --patients 10000 --rounds 2 --local-epochs 1 --skip-sweep
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedcore.engine.runner import run_experiment
from fedcore.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]
SHRINK = ["repeats=2", "training.rounds=3", "training.local_epochs=1", "data.settings.patients_per_site=5000"]


def per_audit(args: argparse.Namespace, out: Path) -> None:
    """Train one (arm, repeat) in this process, then run each audit on its final model; wall and CPU."""
    import numpy as np

    from fedcore.audit import run_audits
    from fedcore.engine.runner import load_data
    from fedcore.spec import PluginRef
    from fedcore.types import PrivacySpent, Weights

    overrides = [
        "repeats=1",
        "baseline.centralized=false",
        "ledger=null",
        f"data.settings.patients_per_site={args.patients}",
        f"training.rounds={args.rounds}",
        f"training.local_epochs={args.local_epochs}",
    ]
    experiment = load_experiment(REPO / "specs" / "paper.yaml", overrides)
    spec = experiment.spec
    load_data(spec, spec.seed, experiment.plugins)  # data generation is not training: load it first
    wall, cpu = time.perf_counter(), time.process_time()
    run_dir = run_experiment(experiment, out=out / "per-audit", workers=1, progress=False)
    cpu = time.process_time() - cpu  # includes the preflight and the report (under 1 % at full size)
    run = json.loads((run_dir / "summary.json").read_text())["arms"][0]["federated"]["runs"][0]
    training = (run["wall_seconds"], cpu)
    weights = Weights(arrays=dict(np.load(run_dir / "checkpoints" / "federated-main-r0.npz")))
    privacy = [PrivacySpent.model_validate(p) for p in run["privacy"]]
    data = load_data(spec, spec.seed, experiment.plugins)
    lira = PluginRef(use="membership-lira", settings={"shadows": args.shadows, **({"shadow_fraction": args.shadow_fraction} if args.shadow_fraction else {})})
    groups = {
        "membership-loss": [PluginRef(use="membership-loss")],
        f"membership-lira ({args.shadows} shadows)": [lira],
    }
    print(f"\nPer audit, paper workload ({args.patients} patients per site, {args.rounds} rounds x "
          f"{args.local_epochs} local epochs, DP-SGD epsilon = 1): training {training[0]:.1f} s wall, "
          f"{training[1]:.1f} s CPU (one thread, in this process)")  # fmt: skip
    print("| audit | wall s | CPU s | x training (wall) | x training (CPU) | target |")
    print("|---|---:|---:|---:|---:|---|")
    targets = {"membership-loss": "<= 0.05x", "membership-lira": "<= 2x"}
    for label, refs in groups.items():
        wall, cpu = time.perf_counter(), time.process_time()
        run_audits(spec.model_copy(update={"audits": refs}), experiment.plugins, data, weights, privacy, spec.seed)
        took = (time.perf_counter() - wall, time.process_time() - cpu)
        print(f"| {label} | {took[0]:.2f} | {took[1]:.2f} | {took[0] / training[0]:.3f} | {took[1] / training[1]:.3f} "
              f"| {targets[refs[0].use]} |")  # fmt: skip


def sweep(args: argparse.Namespace, out: Path) -> None:
    """Each sweep a fresh ``fedcore run`` process (cold caches for both), alternating without/with."""
    spec = REPO / "specs" / "paper-epsilon-sweep.yaml"
    shrink = SHRINK if args.sweep_shrink else []
    fedcore = str(Path(sys.executable).with_name("fedcore"))
    timings: dict[str, list[tuple[float, float]]] = {"without audits": [], "with audits": []}
    for trial in range(args.trials):
        for label, extra in (("without audits", ["audits=[]"]), ("with audits", [])):
            sets = [item for value in (*shrink, *extra) for item in ("--set", value)]
            target = out / f"sweep-{trial}-{label.replace(' ', '-')}"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = time.perf_counter()
            subprocess.run([fedcore, "run", str(spec), *sets, "--out", str(target), "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            timings[label].append((time.perf_counter() - wall, cpu))
    size = "shrunk (" + ", ".join(SHRINK) + ")" if args.sweep_shrink else "full"
    print(f"\nEpsilon sweep, {size}, `fedcore run` processes, {args.trials} alternating trial(s):")
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
    parser.add_argument("--shadow-fraction", type=float, default=None, help="default: the plugin's")
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
