"""fedcore's sequential engine against the fastest plain PyTorch FedAvg loop, same work, same process.

Both train the same model on the same sites with the same batches (one
permutation per epoch, contiguous slices, fused Adam, one thread) and
aggregate with FedAvg; fedcore's time is its rounds' ``round_seconds``
(broadcast, local training, update messages, aggregation; evaluation excluded,
as the plain loop does none). The two alternate, so machine noise hits both.

    python benchmarks/engine_overhead.py            # paper workload: 3 x 50,000 rows, 1 round x 5 epochs
    python benchmarks/engine_overhead.py --rows 10000 --trials 3

Prints ``ratio: X`` = fedcore time / plain time (target <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fedcore.engine.simulation import RunJob, derive_seed, initial_module, run_federated
from fedcore.registry import PluginManager
from fedcore.spec import build_components
from paper_spec import paper_experiment


def plain_fedavg(spec, components, data, seed: int) -> float:
    """The fastest straightforward FedAvg loop: returns seconds for all rounds."""
    start_model = initial_module(components, data, seed)
    global_state = {k: v.clone() for k, v in start_model.state_dict().items()}
    models = [components.model.build(data.n_features, data.n_classes) for _ in data.sites]
    generators = [torch.Generator().manual_seed(derive_seed(seed, 1, s.site)) for s in data.sites]
    tensors = [(torch.from_numpy(s.x_train), torch.from_numpy(s.y_train)) for s in data.sites]
    total = sum(s.n_train for s in data.sites)
    batch = spec.training.batch_size
    began = time.perf_counter()
    for _ in range(spec.training.rounds):
        new_state = {k: v.clone() for k, v in global_state.items()}
        for model, gen, (x, y), site in zip(models, generators, tensors, data.sites):
            model.load_state_dict(global_state)
            opt = torch.optim.Adam(model.parameters(), lr=spec.training.learning_rate, fused=True)
            for _ in range(spec.training.local_epochs):
                perm = torch.randperm(len(y), generator=gen)
                xs, ys = x[perm], y[perm]
                for i in range(0, len(ys), batch):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(xs[i : i + batch]), ys[i : i + batch]).backward()
                    opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    new_state[k] += (site.n_train / total) * (v - global_state[k])
        global_state = new_state
    return time.perf_counter() - began


def fedcore_rounds(spec, components, data, seed: int) -> float:
    result = run_federated(spec, RunJob(components, data, 0, seed), "bench")
    return sum(r.round_seconds for r in result.records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="patients per site (3 sites)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plugins = PluginManager()
    spec = paper_experiment(args.rows, args.rounds, args.epochs, dp=False, plugins=plugins).spec
    data = build_components(spec, plugins).dataset.load(0)
    plain_times, fedcore_times = [], []
    for trial in range(args.trials):
        plain_times.append(plain_fedavg(spec, build_components(spec, plugins), data, seed=trial))
        fedcore_times.append(fedcore_rounds(spec, build_components(spec, plugins), data, seed=trial))
        print(f"trial {trial}: plain {plain_times[-1]:.2f} s, fedcore {fedcore_times[-1]:.2f} s", flush=True)
    steps = args.rounds * args.epochs * sum(-(-s.n_train // 32) for s in data.sites)
    plain, ours = statistics.median(plain_times), statistics.median(fedcore_times)
    print(f"workload: 3 sites x {args.rows} rows, {args.rounds} round(s) x {args.epochs} epochs, {steps} steps")
    print(f"plain PyTorch: {plain:.2f} s ({1e6 * plain / steps:.0f} us/step)")
    print(f"fedcore:       {ours:.2f} s ({1e6 * ours / steps:.0f} us/step)")
    print(f"ratio: {ours / plain:.3f}")


if __name__ == "__main__":
    main()
