"""A plain Flower app running the same loop as fedcore's deployment, for ``benchmarks/deployment.py``.

Each round: the ServerApp sends the global MLP to every SuperNode (train), the
ClientApp trains it with plain PyTorch (Adam, batch 32) on random tensors the
size of its site's training split, replies with the weights; FedAvg; then an
evaluate message with the new model. No fedcore code runs in it.

``sim_server`` / ``sim_client``: the pair ``benchmarks/compare_peers.py`` runs in Flower's
simulation engine (``run_simulation``, Ray actors) on real site data written by the
benchmark: each ClientApp runs the plain PyTorch loop of ``engine_speed.train_plain`` with
its site's generator kept in ``context.state`` between rounds (so the batches are the
plain loop's); the ServerApp averages (FedAvg) and scores the pooled test split every round.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


def _mlp(n_features: int, n_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, n_classes),
    )


def _record(module: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(v.detach().numpy().copy()) for k, v in module.state_dict().items()})


def train_round(grid: Grid, nodes: list[int], model: torch.nn.Module, config: dict) -> list[Message]:
    """One FedAvg round: ``model`` and ``config`` (with its ``round``) to every node as a train
    message; ``model`` becomes the replies' average weighted by their ``n``; the replies."""
    content = RecordDict({"model": _record(model), "cfg": ConfigRecord(config)})
    messages = [grid.create_message(content, "train", n, str(config["round"])) for n in nodes]
    replies = [r for r in grid.send_and_receive(messages, timeout=3600) if r.has_content()]
    total = sum(int(r.content["cfg"]["n"]) for r in replies)
    state = {k: sum(r.content["model"][k].numpy() * int(r.content["cfg"]["n"]) for r in replies) / total for k in model.state_dict()}
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
    return replies


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n_sites, rounds = int(cfg["sites"]), int(cfg["rounds"])
    deadline = time.monotonic() + 300
    while len(list(grid.get_node_ids())) < n_sites and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())[:n_sites]
    torch.manual_seed(0)
    model = _mlp(int(cfg["features"]), int(cfg["classes"]))
    times = []
    for round_ in range(1, rounds + 1):
        start = time.perf_counter()
        train_round(grid, nodes, model, {"round": round_})
        trained = time.perf_counter() - start
        content = RecordDict({"model": _record(model), "cfg": ConfigRecord({"round": round_})})
        list(grid.send_and_receive([grid.create_message(content, "evaluate", n, str(round_)) for n in nodes], timeout=3600))
        times.append({"round": round_, "round_seconds": trained, "with_evaluation": time.perf_counter() - start})
        with open(str(cfg["out"]), "w") as handle:  # after every round: the benchmark marks the relays' counters
            json.dump(times, handle)


@client.train()
def train(message: Message, context: Context) -> Message:
    cfg = context.node_config
    torch.set_num_threads(1)  # as fedcore's sites train (execution.threads_per_worker: 1), three to a 2-core machine
    n, n_features, n_classes = int(cfg["rows"]), int(cfg["features"]), int(cfg["classes"])
    generator = torch.Generator().manual_seed(int(message.content["cfg"]["round"]))
    x, y = torch.randn(n, n_features, generator=generator), torch.randint(0, n_classes, (n,), generator=generator)
    model = _mlp(n_features, n_classes)
    model.load_state_dict({k: torch.from_numpy(a.numpy()) for k, a in message.content["model"].items()})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    for _ in range(int(cfg["epochs"])):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, 32):
            index = perm[start : start + 32]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return Message(RecordDict({"model": _record(model), "cfg": ConfigRecord({"n": n})}), reply_to=message)


@client.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return Message(RecordDict({"cfg": ConfigRecord({"ok": 1})}), reply_to=message)


# --- the simulation pair for compare_peers.py ---------------------------------------------

sim_server = ServerApp()
sim_client = ClientApp()
SIM: dict = {}
"""compare_peers sets ``SIM["config"]`` before ``run_simulation`` (the ServerApp runs in its
process) and reads ``SIM["result"]``: wall and CPU seconds per round (CPU: the ClientApps'
training, measured in the actors, plus this process's) and the final test accuracy."""


@sim_server.main()
def sim_main(grid: Grid, context: Context) -> None:
    from compare_peers import pooled_accuracy  # this folder: the simulation runs from compare_peers

    cfg = SIM["config"]
    folder = str(cfg["data"])
    model = torch.load(f"{folder}/model.pt", weights_only=False)
    test = np.load(f"{folder}/test.npz")
    nodes = sorted(grid.get_node_ids())
    times, cpu, accuracy = [], [], float("nan")
    for round_ in range(1, int(cfg["rounds"]) + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        replies = train_round(grid, nodes, model, {**cfg, "round": round_})
        accuracy = pooled_accuracy(model, test["x"], test["y"])
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu + sum(float(r.content["cfg"]["cpu"]) for r in replies))
    SIM["result"] = {"seconds": times, "cpu_seconds": cpu, "accuracy": accuracy}


@sim_client.train()
def sim_train(message: Message, context: Context) -> Message:
    from types import SimpleNamespace

    from engine_speed import train_plain  # the plain loop itself (this folder is on the actors' path)

    torch.set_num_threads(1)
    start = time.process_time()
    cfg = message.content["cfg"]
    site = int(context.node_config["partition-id"])
    folder = str(cfg["data"])
    data = np.load(f"{folder}/site-{site}.npz")
    model = torch.load(f"{folder}/model.pt", weights_only=False)
    model.load_state_dict({k: torch.from_numpy(a.numpy()) for k, a in message.content["model"].items()})
    generator = torch.Generator()
    if "generator" in context.state:
        generator.set_state(torch.from_numpy(context.state["generator"]["state"].numpy()))
    else:
        generator.manual_seed(int(cfg["seeds"][site]))
    training = SimpleNamespace(learning_rate=float(cfg["lr"]), local_epochs=int(cfg["epochs"]), batch_size=int(cfg["batch"]))
    train_plain(model, data["x"], data["y"], training, generator)
    context.state["generator"] = ArrayRecord({"state": Array.from_numpy_ndarray(generator.get_state().numpy())})
    reply = ConfigRecord({"n": len(data["y"]), "cpu": time.process_time() - start})
    return Message(RecordDict({"model": _record(model), "cfg": reply}), reply_to=message)
