"""fedcore beside what a user would pick instead: seconds per round and test accuracy, one workload, one run.

    pip install -e '.[bench]'      # flwr with its simulation engine (Ray); opacus is a core dependency
    .venv/bin/python -W ignore benchmarks/compare_peers.py                        # the paper workload
    .venv/bin/python -W ignore benchmarks/compare_peers.py --rows 5000 --epochs 1 --rounds 2 --json out.json

Workload (default: the paper's): ``specs/paper.yaml`` resized by ``--rows`` (patients per
site; 3 sites, 80 % of them train), ``--epochs`` local epochs, ``--rounds`` FedAvg rounds:
MLP 128-64-32 with softmax output, Adam lr 1e-3, batch 32, one repeat. Arms:

- ``fedcore sequential`` / ``fedcore vectorized``: ``run_federated`` / ``run_repeats_vectorized``
  (1 repeat; its step graphs compiled in a warm-up run first, not timed), whole rounds
  including every site's evaluation;
- ``fedcore vectorized DP-SGD``: the paper's record-level Gaussian DP (epsilon 1) on the vectorized engine;
- ``plain PyTorch``: FedAvg written plainly, the 3 sites one after another with the
  engines' batches (``engine_speed.train_plain``: each site's generator seeded as fedcore seeds it);
- ``Flower simulation``: ``flwr.simulation.run_simulation`` (Ray), 1 and 2 actors, whose
  ClientApp runs that same plain loop on the same batches (``flower_baseline_app.sim_client``);
  seconds per round measured in the ServerApp (Ray's start-up is printed apart);
- ``Opacus DP-SGD``: the plain loop with Opacus's ``PrivacyEngine`` (Poisson sampling),
  the same noise multiplier, clipping norm and sampling rate as fedcore's DP arm.

Beside each: the pooled test accuracy after the same rounds (same initial model, same
split), so no speed is bought with a different computation. Every process runs one torch
thread; the ``cores`` column says how many processes trained at once. The machine may be
shared: compare figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine_speed import load, train_plain
from paper_spec import paper_experiment

HERE = Path(__file__).resolve().parent
ARMS = ("sequential", "vectorized", "vectorized-dp", "plain", "flower", "opacus")


@dataclass
class Arm:
    """One row: wall (and, in one process, CPU) seconds of every round, and the final test accuracy."""

    label: str
    cores: str
    seconds: list[float]
    accuracy: float
    cpu_seconds: list[float] = field(default_factory=list)
    note: str = ""

    @staticmethod
    def steady(values: Sequence[float]) -> float:
        """Mean of the rounds after the first (the first pays one-off start-up: lazy imports,
        actors, allocator), or the only round; NaN without values."""
        values = list(values)[1:] or list(values)
        return float(np.mean(values)) if values else float("nan")

    @property
    def per_round(self) -> float:
        return self.steady(self.seconds)


class Clock:
    """Wall and CPU seconds of this process at every :meth:`lap` (a round's end)."""

    def __init__(self) -> None:
        self.last = (time.perf_counter(), time.process_time())
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def lap(self, *_: object) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall.append(now[0] - self.last[0])
        self.cpu.append(now[1] - self.last[1])
        self.last = now


# --- fedcore ----------------------------------------------------------------------------------


def fedcore_arm(label: str, exp: Any, data: Any, seed: int, vectorized: bool, warm_up: Any = None) -> Arm:
    """One federated run of the engine; ``warm_up``: an experiment run once before (compiles its graphs)."""
    from fedcore.spec import build_components

    if vectorized:
        from fedcore.engine.vectorized import RunJob, run_repeats_vectorized

        def run(e: Any, on_round: Any) -> Any:
            return run_repeats_vectorized(e.spec, [RunJob(build_components(e.spec, e.plugins), data, 0, seed)], "bench", on_round)[0]
    else:
        from fedcore.engine.simulation import RunJob, run_federated

        def run(e: Any, on_round: Any) -> Any:
            return run_federated(e.spec, RunJob(build_components(e.spec, e.plugins), data, 0, seed), "bench", on_round)

    if warm_up is not None:
        run(warm_up, None)
    clock = Clock()
    result = run(exp, clock.lap)
    note = "whole rounds incl. every site's evaluation"
    if result.records[-1].privacy:
        spent = result.records[-1].privacy[0]
        note += f"; epsilon {spent.epsilon:.3f} ({spent.accountant}), sigma {spent.noise_multiplier:.4f}"
    return Arm(label, "1", clock.wall, result.records[-1].test.accuracy, clock.cpu, note)


def dp_parameters(exp: Any, data: Any, seed: int) -> dict[int, Any]:
    """The DP-SGD parameters fedcore's DP arm calibrates for each site (noise multiplier, clip, sampling rate)."""
    from fedcore.engine.simulation import site_stages
    from fedcore.spec import build_components

    components = build_components(exp.spec, exp.plugins)
    return {
        site.site: next(s.dp_parameters for s in site_stages(exp.spec, components, data, site, seed) if hasattr(s, "dp_parameters"))
        for site in data.sites
    }


# --- peers: FedAvg written plainly, with plain or Opacus local training -------------------------


def pooled_test(data: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([s.x_test for s in data.sites]), np.concatenate([s.y_test for s in data.sites])


def pooled_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``model`` on the pooled test split (what fedcore's records call test accuracy)."""
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[int]) -> dict[str, torch.Tensor]:
    """The states' average weighted by the sites' training rows (fedcore's ``fedavg``)."""
    total = float(sum(weights))
    return {k: sum(s[k].double() * (n / total) for s, n in zip(states, weights, strict=True)).float() for k in states[0]}


LocalTraining = Callable[[torch.nn.Module, Any, torch.Generator], None]


def peer_fedavg(label: str, exp: Any, data: Any, seed: int, train: LocalTraining, note: str = "") -> Arm:
    """FedAvg over ``exp``'s rounds, the sites one after another, each trained by ``train``
    (a fresh module from the global weights, the site's generator as fedcore seeds it)."""
    from fedcore.engine.simulation import derive_seed, initial_module
    from fedcore.spec import build_components

    components = build_components(exp.spec, exp.plugins)
    model = initial_module(components, data, seed)
    generators = [torch.Generator().manual_seed(derive_seed(seed, 1, site.site)) for site in data.sites]
    x_test, y_test = pooled_test(data)
    clock, accuracy = Clock(), float("nan")
    for _ in range(exp.spec.training.rounds):
        states = []
        for site, generator in zip(data.sites, generators, strict=True):
            local = components.model.build(data.n_features, data.n_classes)
            local.load_state_dict(model.state_dict())
            train(local, site, generator)
            states.append({k: v.detach() for k, v in local.state_dict().items()})
        model.load_state_dict(fedavg(states, [len(site.y_train) for site in data.sites]))
        accuracy = pooled_accuracy(model, x_test, y_test)
        clock.lap()
    return Arm(label, "1", clock.wall, accuracy, clock.cpu, note)


def opacus_training(exp: Any, params: dict[int, Any], mode: str) -> tuple[LocalTraining, Callable[[], float]]:
    """Local training by Opacus with fedcore's DP parameters; and the largest epsilon its
    accountants (one per site, over every round, same accountant as the spec) give.

    :param params: fedcore's calibrated DP-SGD parameters by site (:func:`dp_parameters`)."""
    from opacus import PrivacyEngine

    from dp_training import opacus_private

    training = exp.spec.training
    accountant = exp.spec.privacy[0].settings["accountant"]
    delta = exp.spec.privacy[0].settings["delta"]
    engines: dict[int, PrivacyEngine] = {}

    def train(module: torch.nn.Module, site: Any, generator: torch.Generator) -> None:
        p = params[site.site]
        engine = engines.setdefault(site.site, PrivacyEngine(accountant=accountant))
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(site.x_train), torch.from_numpy(site.y_train))
        # Opacus's Poisson loader samples at 1 / len(loader): the batch size that gives fedcore's rate.
        loader = torch.utils.data.DataLoader(dataset, batch_size=round(p.sample_rate * len(dataset)), generator=generator)
        optimizer = torch.optim.Adam(module.parameters(), lr=training.learning_rate)
        model, optimizer, criterion, loader = opacus_private(engine, module, optimizer, loader, p.noise_multiplier, p.max_grad_norm, mode)
        for _ in range(training.local_epochs):
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                criterion(model(xb), yb).backward()
                optimizer.step()

    def epsilon() -> float:
        return max(engine.get_epsilon(delta) for engine in engines.values())

    return train, epsilon


# --- Flower's simulation engine (a child process per arm: Ray starts and stops cleanly) ----------


def write_sites(folder: str, exp: Any, data: Any, seed: int) -> dict[str, Any]:
    """The sites' training splits, the pooled test split and the initial module, for the
    Flower apps; the config the ServerApp sends with every round."""
    from fedcore.engine.simulation import derive_seed, initial_module
    from fedcore.spec import build_components

    for index, site in enumerate(data.sites):
        np.savez(f"{folder}/site-{index}.npz", x=site.x_train, y=site.y_train)
    x_test, y_test = pooled_test(data)
    np.savez(f"{folder}/test.npz", x=x_test, y=y_test)
    torch.save(initial_module(build_components(exp.spec, exp.plugins), data, seed), f"{folder}/model.pt")
    training = exp.spec.training
    return {
        "data": folder, "rounds": training.rounds, "epochs": training.local_epochs, "batch": training.batch_size,
        "lr": training.learning_rate, "seeds": [derive_seed(seed, 1, site.site) for site in data.sites],
    }


def flower_child(config: dict[str, Any], actors: int, sites: int) -> dict[str, Any]:
    """Run the simulation with ``actors`` Ray actors of one CPU each (in a fresh process)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    # Ray's workers import the ClientApp's module (and the plain loop) from this folder.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import logging

    import flower_baseline_app as app
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)  # deprecation notices of every message
    app.SIM["config"] = config
    began = time.perf_counter()
    run_simulation(
        app.sim_server,
        app.sim_client,
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": actors, "num_gpus": 0, "object_store_memory": 256 * 2**20, "log_to_driver": False},
        },
    )
    result = app.SIM.get("result")
    if result is None:
        raise RuntimeError("the Flower simulation ended without the ServerApp's result (see its log above)")
    result["total"] = time.perf_counter() - began
    return result


def flower_arm(config: dict[str, Any], actors: int, sites: int) -> Arm:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(flower_child, config, actors, sites).result(timeout=3600)
    startup = result["total"] - sum(result["seconds"])
    note = f"the plain loop in the ClientApp; CPU: actors' training + server process; Ray start-up and shut-down {startup:.1f} s not counted"
    label = f"Flower simulation, {actors} actor{'s' if actors > 1 else ''}"
    return Arm(label, f"{actors} (+ server)", result["seconds"], result["accuracy"], result["cpu_seconds"], note)


def ray_available() -> bool:
    try:
        import flwr.simulation  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# --- the run -------------------------------------------------------------------------------------


def compare(rows: int, epochs: int, rounds: int, seed: int = 2024, arms: Sequence[str] = ARMS,
            actors: Sequence[int] = (1, 2), opacus_mode: str = "hooks") -> list[Arm]:
    """Every asked arm on one workload, in this process (Flower: one child process per actor count)."""
    torch.set_num_threads(1)
    exp = paper_experiment(rows, rounds, epochs, dp=False)
    exp_dp = paper_experiment(rows, rounds, epochs, dp=True)
    data = load(exp, seed)
    training = exp.spec.training
    out: list[Arm] = []

    def add(arm: Arm) -> None:
        out.append(arm)
        progress(arm)

    if "plain" in arms:
        add(peer_fedavg("plain PyTorch FedAvg, 3 sites one after another", exp, data, seed,
            lambda m, s, g: train_plain(m, s.x_train, s.y_train, training, g), "fused Adam, sliced batches"))
    if "sequential" in arms:
        add(fedcore_arm("fedcore sequential engine", exp, data, seed, vectorized=False))
    if "vectorized" in arms:
        add(fedcore_arm("fedcore vectorized engine, 1 repeat", exp, data, seed, True, paper_experiment(rows, 1, 1, dp=False)))
    if "flower" in arms:
        with tempfile.TemporaryDirectory(prefix="fedcore-peers-") as folder:
            config = write_sites(folder, exp, data, seed)
            for n in actors:
                add(flower_arm(config, n, len(data.sites)))
    if "vectorized-dp" in arms:
        add(fedcore_arm("fedcore vectorized DP-SGD, 1 repeat", exp_dp, data, seed, True, paper_experiment(rows, 1, 1, dp=True)))
    if "opacus" in arms:
        params = dp_parameters(exp_dp, data, seed)
        train, epsilon = opacus_training(exp_dp, params, opacus_mode)
        torch.manual_seed(seed)
        arm = peer_fedavg(f"Opacus DP-SGD ({opacus_mode}), FedAvg as plain", exp_dp, data, seed, train)
        first = next(iter(params.values()))
        arm.note = (f"fedcore's sigma {first.noise_multiplier:.4f}, clip {first.max_grad_norm:g}, q {first.sample_rate:.3g}; "
                    f"Opacus's epsilon {epsilon():.3f}")
        add(arm)
    return out


def progress(arm: Arm) -> None:
    """One line on stderr as each arm ends (a paper-size run takes minutes)."""
    print(f"[compare_peers] {arm.label}: {arm.per_round:.2f} s/round, accuracy {arm.accuracy:.4f}", file=sys.stderr, flush=True)


def table(arms: Sequence[Arm], header: str) -> str:
    """The markdown table: s/round (wall; CPU where one process), ratio to the plain loop, accuracy."""
    plain = next((a.per_round for a in arms if a.label.startswith("plain")), float("nan"))
    lines = [header, "", "| arm | cores | s/round (wall) | CPU s/round | plain / arm (wall) | round 1 (wall s) | test accuracy | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for a in arms:
        cpu = f"{a.steady(a.cpu_seconds):.2f}" if a.cpu_seconds else "-"
        lines.append(f"| {a.label} | {a.cores} | {a.per_round:.2f} | {cpu} | {plain / a.per_round:.2f}x | {a.seconds[0]:.2f} "
                     f"| {a.accuracy:.4f} | {a.note} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Arm]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="patients per site (3 sites; 80%% train)")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    parser.add_argument("--rounds", type=int, default=2, help="FedAvg rounds")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Flower simulation runs, one per actor count")
    parser.add_argument("--opacus-mode", default="hooks", choices=("hooks", "ew", "functorch", "ghost"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    arms = list(args.arms)
    if "flower" in arms and not ray_available():
        print("Flower simulation skipped: flwr's simulation engine (Ray) is not installed; pip install -e '.[bench]'", file=sys.stderr)
        arms.remove("flower")
    results = compare(args.rows, args.epochs, args.rounds, args.seed, arms, args.actors, args.opacus_mode)
    header = (f"{args.rows:,} patients x 3 sites, MLP 128-64-32, Adam, batch 32, {args.epochs} local epoch(s) x "
              f"{args.rounds} round(s), seed {args.seed}; 1 torch thread per process; s/round: mean of rounds 2.. "
              f"(round 1 apart: start-up); pooled test accuracy after the last round")
    print(table(results, header))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "arms": [{**asdict(a), "per_round": a.per_round} for a in results]}, indent=1))
    return results


if __name__ == "__main__":
    main()
