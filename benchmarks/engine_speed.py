"""Seconds per round of the paper workload: plain PyTorch vs the sequential and vectorized engines.

    .venv/bin/python benchmarks/engine_speed.py            # everything below, one run
    .venv/bin/python benchmarks/engine_speed.py --quick    # 1 local epoch per round (x5 printed as well)

Prints, in one run and as ratios to a plain PyTorch loop on the same work (the paper
workload: 3 sites x 50,000 rows (40,000 train), MLP 128-64-32, Adam, batch 32, 5 local epochs):

- seconds per round of one repeat: plain loop, sequential engine, vectorized engine;
- per-repeat seconds per round when 10 repeats train as one computation, in one process
  and split over two processes (both cores);
- DP-SGD (gaussian, record level, epsilon 1): vectorized DP vs vectorized non-private (1
  repeat: the median of ``--trials`` alternating pairs; 10 repeats in one process and over
  two as ``specs/paper.yaml`` runs them), vs the plain non-private loop, the cost of the
  noise alone (fedcore's sampler and torch's), and the sequential engine's DP path;
- the centralized baseline's seconds per epoch (plain loop vs 10 repeats vectorized);
- an estimate of the full ``specs/paper.yaml`` (10 repeats x 10 rounds with DP plus 10
  centralized baselines of 50 epochs) from those figures.

The machine is shared: compare ratios measured in the same run, not absolute seconds
across runs. Vectorized figures are steady-state rounds (compilation happens in a
warm-up round first and is printed separately).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from paper_spec import paper_experiment


def experiment(rows: int = 50_000, rounds: int = 1, epochs: int = 5, dp: bool = False):
    return paper_experiment(rows, rounds, epochs, dp)


def load(exp, seed: int):
    from fedcore.spec import build_components

    return build_components(exp.spec, exp.plugins).dataset.load(seed)


class Clock:
    """CPU seconds of this process (robust to other users of a shared machine) and wall seconds."""

    def __enter__(self) -> "Clock":
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall


def plain_round(exp, data, seed: int) -> Clock:
    """One round written as plain PyTorch (the fastest loop: fused Adam, sliced batches)."""
    from fedcore.engine.simulation import derive_seed, initial_module
    from fedcore.spec import build_components

    components = build_components(exp.spec, exp.plugins)
    start = initial_module(components, data, seed).state_dict()
    training = exp.spec.training
    with Clock() as clock:
        for site in data.sites:
            model = components.model.build(data.n_features, data.n_classes)
            model.load_state_dict(start)
            gen = torch.Generator().manual_seed(derive_seed(seed, 1, site.site))
            train_plain(model, site.x_train, site.y_train, training, gen)
    return clock


def train_plain(model: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, training, gen: torch.Generator) -> None:
    """Local training written as plain PyTorch (fused Adam, sliced batches of a fresh permutation
    per epoch drawn from the site's generator, as the engines draw it): the peers' loop."""
    opt = torch.optim.Adam(model.parameters(), lr=training.learning_rate, fused=True)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(training.local_epochs):
        perm = torch.randperm(len(y), generator=gen)
        xs, ys = x[perm], y[perm]
        for i in range(0, len(ys), training.batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[i : i + training.batch_size]), ys[i : i + training.batch_size]).backward()
            opt.step()


def plain_centralized_epoch(exp, data, seed: int) -> Clock:
    from fedcore.engine.simulation import initial_module, pooled_site
    from fedcore.spec import build_components

    site = pooled_site(data)
    model = initial_module(build_components(exp.spec, exp.plugins), data, seed)
    opt = torch.optim.Adam(model.parameters(), lr=exp.spec.training.learning_rate, fused=True)
    x, y = torch.from_numpy(site.x_train), torch.from_numpy(site.y_train)
    with Clock() as clock:
        perm = torch.randperm(len(y))
        xs, ys = x[perm], y[perm]
        for i in range(0, len(ys), 32):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[i : i + 32]), ys[i : i + 32]).backward()
            opt.step()
    return clock


def sequential_round(exp, data, seed: int) -> Clock:
    """One whole round of the sequential engine (training, aggregation, evaluation)."""
    from fedcore.engine.simulation import RunJob, run_federated
    from fedcore.spec import build_components

    components = build_components(exp.spec, exp.plugins)
    with Clock() as clock:
        run_federated(exp.spec, RunJob(components, data, 0, seed), "bench")
    return clock


def vectorized_round(exp, datas, seeds) -> Clock:
    """One whole round of ``len(datas)`` repeats trained together (per-repeat share returned)."""
    from fedcore.engine.vectorized import RunJob, run_repeats_vectorized
    from fedcore.spec import build_components

    jobs = [RunJob(build_components(exp.spec, exp.plugins), d, r, s) for r, (d, s) in enumerate(zip(datas, seeds))]
    with Clock() as clock:
        run_repeats_vectorized(exp.spec, jobs, "bench")
    clock.cpu /= len(datas)
    clock.wall /= len(datas)
    return clock


def centralized_vectorized_epoch(exp, datas, seeds) -> Clock:
    from fedcore.engine.vectorized import RunJob, run_centralized_vectorized
    from fedcore.spec import build_components

    spec = exp.spec.model_copy(update={"baseline": exp.spec.baseline.model_copy(update={"epochs": 1})})
    jobs = [RunJob(build_components(spec, exp.plugins), d, r, s) for r, (d, s) in enumerate(zip(datas, seeds))]
    run_centralized_vectorized(spec, [jobs[0]] * len(jobs), "warm-up")
    with Clock() as clock:
        run_centralized_vectorized(spec, jobs, "bench")
    clock.cpu /= len(datas)
    clock.wall /= len(datas)
    return clock


def _worker(args: tuple[int, int, int, bool]) -> float:
    """A worker process: warm up, then one round of ``count`` repeats together; its wall seconds."""
    first, count, epochs, dp = args
    torch.set_num_threads(1)
    exp = experiment(rounds=1, epochs=epochs, dp=dp)
    seeds = [2024 + first + r for r in range(count)]
    datas = [load(exp, s) for s in seeds]
    vectorized_round(exp, datas, seeds)
    return vectorized_round(exp, datas, seeds).wall * count


def noise_seconds_per_round(data, epochs: int) -> tuple[float, float]:
    """CPU seconds to draw one round's DP noise for every site of one repeat and nothing else
    (``P`` values per site and step): fedcore's AES-CTR streams, and torch's ``normal_``."""
    from fedcore.engine.simulation import initial_module
    from fedcore.noise import GaussianNoise
    from fedcore.spec import build_components

    exp = experiment(rounds=1, epochs=epochs, dp=True)
    size = sum(p.numel() for p in initial_module(build_components(exp.spec, exp.plugins), data, 0).parameters())
    sites = len(data.sites)
    steps = sum(-(-len(site.y_train) // 32) for site in data.sites) * epochs // sites
    out = torch.empty(sites, size)
    streams = GaussianNoise([bytes([s]) * 16 for s in range(sites)], size)
    with Clock() as ours:
        for _ in range(steps):
            streams.draw(out, [1.0] * sites)
    generators = [torch.Generator().manual_seed(s) for s in range(sites)]
    with Clock() as theirs:
        for _ in range(steps):
            for row, generator in zip(out, generators):
                row.normal_(0.0, 1.0, generator=generator)
    return ours.cpu, theirs.cpu


@dataclass
class Row:
    label: str
    clock: Clock
    note: str = ""


def dp_overhead_pairs(exp, exp_dp, data, seed: int, trials: int) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """A DP-SGD round / a non-private round of one repeat, per alternating pair: in CPU
    seconds (every thread of the process, the DP round's noise-drawing helper included) and
    in wall seconds (what that helper saves on a second core); and each pair's CPU seconds
    (DP, non-private)."""
    cpu, wall, seconds = [], [], []
    for _ in range(trials):
        non_private = vectorized_round(exp, [data], [seed])
        private = vectorized_round(exp_dp, [data], [seed])
        cpu.append(private.cpu / non_private.cpu)
        wall.append(private.wall / non_private.wall)
        seconds.append((private.cpu, non_private.cpu))
    return cpu, wall, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 local epoch per round instead of 5 (figures x5 shown)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-sequential-dp", action="store_true", help="the sequential DP round is the slowest part")
    parser.add_argument("--trials", type=int, default=5, help="alternating DP / non-private 1-repeat rounds for the overhead's median")
    parser.add_argument("--overhead-only", action="store_true", help="only the 1-repeat DP-SGD overhead (issue 19's second target)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # numpy's BLAS too, as in fedcore's workers (engine.runner._worker_init): its idle pool
    # spins on the other core, CPU time charged to whichever round calls it.
    threadpool_limits(1, user_api="blas")
    epochs = 1 if args.quick else 5
    scale = 5 / epochs
    seed = 2024
    exp = experiment(rounds=1, epochs=epochs)
    exp_dp = experiment(rounds=1, epochs=epochs, dp=True)
    seeds = [seed + r for r in range(args.repeats)]
    datas = [load(exp, s) for s in seeds]
    data = datas[0]

    # Warm-up: compile every step shape once per process (the engine caches them process-wide).
    vectorized_round(exp, [data], [seed])
    if args.overhead_only:
        vectorized_round(exp_dp, [data], [seed])
        ratios, walls, seconds = dp_overhead_pairs(exp, exp_dp, data, seed, args.trials)
        private, non_private = np.median(np.array(seconds), axis=0)
        print(f"DP-SGD overhead, 1 repeat, median of {len(ratios)} alternating pairs of rounds, CPU seconds: "
              f"{float(np.median(ratios)):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}; target <= 1.5)")
        print(f"  CPU seconds a round (medians): DP {private:.3f}, non-private {non_private:.3f}")
        print(f"  the same in wall seconds: "
              f"{float(np.median(walls)):.2f}x (range {min(walls):.2f}-{max(walls):.2f})")
        return
    vectorized_round(exp, datas, seeds)
    vectorized_round(exp_dp, [data], [seed])
    vectorized_round(exp_dp, datas, seeds)

    rows = [
        Row("plain PyTorch loop, 3 sites one after another", plain_round(exp, data, seed)),
        Row("sequential engine (run_federated)", sequential_round(exp, data, seed)),
        Row("vectorized engine, 1 repeat (3 copies)", vectorized_round(exp, [data], [seed])),
        Row(f"vectorized, {args.repeats} repeats in 1 process, per repeat", vectorized_round(exp, datas, seeds)),
    ]
    half = args.repeats // 2

    def two_processes(dp: bool, label: str) -> Row:
        began = time.perf_counter()
        with mp.get_context("spawn").Pool(2) as pool:
            per_worker = pool.map(_worker, [(0, half, epochs, dp), (half, args.repeats - half, epochs, dp)])
        two = Clock()
        two.wall = max(per_worker) / args.repeats
        two.cpu = float("nan")
        return Row(label, two, f"wall of the slower worker; call {time.perf_counter() - began:.0f} s incl. data, compile")

    rows.append(two_processes(False, f"vectorized, {args.repeats} repeats over 2 processes, per repeat"))
    dp1 = vectorized_round(exp_dp, [data], [seed])
    rows.append(Row("vectorized DP-SGD, 1 repeat", dp1))
    rows.append(Row(f"vectorized DP-SGD, {args.repeats} repeats in 1 process, per repeat", vectorized_round(exp_dp, datas, seeds)))
    rows.append(two_processes(True, f"vectorized DP-SGD, {args.repeats} repeats over 2 processes, per repeat"))
    if not args.skip_sequential_dp:
        rows.append(Row("sequential engine DP-SGD (privacy plugin's path)", sequential_round(experiment(rounds=1, epochs=1, dp=True), data, seed), "1 local epoch, x5"))
        rows[-1].clock.cpu *= epochs
        rows[-1].clock.wall *= epochs
    # The 1-repeat overhead from alternating pairs of rounds: one pair moves with the
    # machine's other jobs by +-5 %; the median of several pairs does not.
    pair_ratios, _, _ = dp_overhead_pairs(exp, exp_dp, data, seed, args.trials)
    central_plain = plain_centralized_epoch(exp, data, seed)
    central_vec = centralized_vectorized_epoch(exp, datas, seeds)

    plain = rows[0].clock
    print(f"\nPaper workload: seconds per round of one repeat (3 sites x 40,000 train rows, 5 local epochs, "
          f"{'measured 1 epoch x5' if args.quick else 'measured'}; torch threads = 1; whole rounds incl. evaluation)")
    print(f"{'':58s} {'CPU s':>7s} {'wall s':>7s} {'speed-up vs plain (CPU)':>24s}")
    for row in rows:
        cpu, wall = row.clock.cpu * scale, row.clock.wall * scale
        ratio = plain.cpu / row.clock.cpu if row.clock.cpu == row.clock.cpu else plain.wall / row.clock.wall
        unit = "" if row.clock.cpu == row.clock.cpu else " (wall)"
        print(f"{row.label:58s} {cpu:7.2f} {wall:7.2f} {ratio:10.2f}x{unit}  {row.note}")
    vec1, vec_r, two_wall = rows[2].clock, rows[3].clock, rows[4].clock
    dp_1, dp_r, dp_two = rows[5].clock, rows[6].clock, rows[7].clock
    print(f"\nDP-SGD overhead (vectorized DP / vectorized non-private, CPU): 1 repeat {dp_1.cpu / vec1.cpu:.2f}x, "
          f"{args.repeats} repeats together {dp_r.cpu / vec_r.cpu:.2f}x; "
          f"{args.repeats} repeats over 2 processes as specs/paper.yaml runs them (wall) {dp_two.wall / two_wall.wall:.2f}x")
    if pair_ratios:
        print(f"DP-SGD overhead, 1 repeat, median of {len(pair_ratios)} alternating pairs of rounds: "
              f"{float(np.median(pair_ratios)):.2f}x (range {min(pair_ratios):.2f}-{max(pair_ratios):.2f})")
    print(f"DP-SGD vs the plain PyTorch loop without DP (CPU): 1 repeat {dp_1.cpu / plain.cpu:.2f}x, "
          f"{args.repeats} repeats together {dp_r.cpu / plain.cpu:.2f}x per repeat")
    noise, torch_noise = (seconds * scale for seconds in noise_seconds_per_round(data, epochs))
    print(f"of which drawing the Gaussian noise alone (P values per site and step): {noise:.2f} CPU s per round of one "
          f"repeat = {noise / (vec1.cpu * scale):.2f}x / {noise / (vec_r.cpu * scale):.2f}x the whole non-private round "
          f"(1 repeat / repeats together); torch's normal_ would take {torch_noise:.2f} ({torch_noise / noise:.2f}x)")
    print(f"centralized baseline, CPU seconds per epoch of 120,000 rows: plain {central_plain.cpu:.2f}, "
          f"{args.repeats} repeats vectorized {central_vec.cpu:.2f} per repeat ({central_plain.cpu / central_vec.cpu:.2f}x)")
    two_vs_one = two_wall.wall / vec_r.wall
    print(f"2 processes x {half} repeats vs 1 process x {args.repeats} (wall per repeat): {two_vs_one:.2f}x")
    share = min(1.0, two_vs_one)
    full = args.repeats * (10 * dp_r.wall * scale * share + 50 * central_vec.wall * share)
    print(f"estimated full specs/paper.yaml wall on this machine now ({args.repeats} repeats x 10 DP rounds + "
          f"{args.repeats} baselines x 50 epochs, both cores): {full / 60:.1f} min")
    cpu_total = args.repeats * (10 * dp_r.cpu * scale + 50 * central_vec.cpu)
    print(f"the same in CPU time: {cpu_total / 60:.1f} CPU min, i.e. {cpu_total / 120:.1f} min on 2 idle cores")
    if not args.skip_sequential_dp:
        sequential_total = args.repeats * (10 * rows[-1].clock.cpu * scale + 50 * central_plain.cpu)
        print(f"sequential engine, same work: {sequential_total / 60:.1f} CPU min ({sequential_total / cpu_total:.1f}x)")


if __name__ == "__main__":
    main()
