"""1,000 simulated sites with small data each: time per round and peak memory.

    .venv/bin/python benchmarks/scale_sites.py                    # 1,000 sites x 200 patients, 3 rounds
    .venv/bin/python benchmarks/scale_sites.py --sites 200 --dp   # record-level DP-SGD at every site

The vectorized engine trains every site of a round as one stacked computation (one
row of a (sites, parameters) tensor per site). For scale, the sequential engine's
time is measured on the first ``--sequential-sites`` sites and extrapolated linearly
(its cost is a loop over sites). Peak memory is the process's maximum resident set
(``ru_maxrss``), printed before and after the vectorized run.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from paper_spec import paper_experiment

#: the paper's DP at epsilon 5 with the (faster) RDP accountant: calibrating for thousands of sites
DP = ["privacy.0.settings.epsilon=5.0", "privacy.0.settings.accountant=rdp"]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=200, help="patients per site (80 %% train)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp", action="store_true")
    parser.add_argument("--sequential-sites", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from fedcore.engine.simulation import RunJob, run_federated
    from fedcore.engine.vectorized import run_federated_vectorized, unsupported_reason
    from fedcore.spec import build_components

    def experiment(sites: int):
        return paper_experiment(args.rows, args.rounds, 5, args.dp, [f"data.settings.sites={sites}", "seed=7", *(DP if args.dp else [])])

    exp = experiment(args.sites)
    data = build_components(exp.spec, exp.plugins).dataset.load(7)
    before = peak_mib()
    reason = unsupported_reason(exp.spec, build_components(exp.spec, exp.plugins), data)
    assert reason is None, reason

    started = time.perf_counter()
    cpu = time.process_time()
    result = run_federated_vectorized(exp.spec, RunJob(build_components(exp.spec, exp.plugins), data, 0, 7), "scale")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = peak_mib()
    rounds = result.records

    small = experiment(args.sequential_sites)
    small_data = type(data)(
        sites=data.sites[: args.sequential_sites], feature_names=data.feature_names, class_names=data.class_names
    )
    seq_started = time.process_time()
    run_federated(small.spec, RunJob(build_components(small.spec, small.plugins), small_data, 0, 7), "scale")
    seq_cpu = (time.process_time() - seq_started) * args.sites / args.sequential_sites

    train_rows = sum(s.n_train for s in data.sites)
    print(f"\n{args.sites} sites x {args.rows} patients ({train_rows:,} training rows), MLP 128-64-32, "
          f"5 local epochs, {args.rounds} rounds{', DP-SGD' if args.dp else ''}; torch threads = 1")
    print(f"vectorized engine: {wall:.1f} s wall, {cpu:.1f} s CPU for {args.rounds} rounds "
          f"({cpu / args.rounds:.1f} CPU s per round incl. evaluation of every site)")
    print("  per round (wall, s): " + ", ".join(f"{r.round_seconds:.1f}" for r in rounds)
          + f"; final test accuracy {rounds[-1].test.accuracy:.3f}")
    print(f"peak memory (max RSS): {before:.0f} MiB after loading data, {after:.0f} MiB after the run")
    print(f"sequential engine on {args.sequential_sites} sites, extrapolated to {args.sites}: "
          f"{seq_cpu:.1f} CPU s for {args.rounds} rounds ({seq_cpu / cpu:.1f}x the vectorized engine)")


if __name__ == "__main__":
    main()
