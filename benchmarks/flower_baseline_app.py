"""A plain Flower app running the same loop as fedcore's deployment, for ``benchmarks/deployment.py``.

Each round: the ServerApp sends the global MLP to every SuperNode (train), the
ClientApp trains it with plain PyTorch (Adam, batch 32) on random tensors the
size of its site's training split, replies with the weights; FedAvg; then an
evaluate message with the new model. No fedcore code runs in it.
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
        content = RecordDict({"model": _record(model), "cfg": ConfigRecord({"round": round_})})
        replies = [r for r in grid.send_and_receive([grid.create_message(content, "train", n, str(round_)) for n in nodes], timeout=3600) if r.has_content()]
        total = sum(int(r.content["cfg"]["n"]) for r in replies)
        state = {k: sum(r.content["model"][k].numpy() * int(r.content["cfg"]["n"]) for r in replies) / total for k in model.state_dict()}
        model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
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
