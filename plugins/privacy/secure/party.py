"""One CrypTen party: the process a site runs to secret-share its update.

A party receives only its own site's update (from its site, over a pipe), splits
it into additive shares with CrypTen (pseudo-random zero sharings from the seeds
the parties exchanged at ``crypten.init``), adds up its shares of every site's
input, and sends the server that one share of the sum. No party and not the
server ever holds another site's update; only the server, adding all shares,
learns the sum.

This module imports CrypTen only inside the party process, so fedcore itself
runs without CrypTen installed.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

import numpy as np

from fedcore.plugins.privacy.secure.channel import FrameSender, int64_body
from fedcore.plugins.privacy.secure.fixed_point import VectorLayout, check_range, encode
from fedcore.types import ClientUpdate

#: where torch 2.13 moved the module CrypTen 0.4.1 imports at load time
_MOVED_MODULES = {"torch.onnx._internal.registration": "torch.onnx._internal.torchscript_exporter.registration"}


def import_crypten() -> ModuleType:
    """Import CrypTen, first aliasing modules newer torch moved (CrypTen 0.4.1 predates torch 2.5)."""
    for old, new in _MOVED_MODULES.items():
        try:
            importlib.import_module(old)
        except ModuleNotFoundError:
            sys.modules[old] = importlib.import_module(new)
    return importlib.import_module("crypten")


class RoundRefused(Exception):
    """Another party's input is out of range; every party skipped the round, still in step."""


@dataclass(frozen=True)
class PartyConfig:
    """What one party process needs to join the computation."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    server_address: tuple[str, int]
    key: bytes
    precision_bits: int
    connect_timeout_s: float
    gloo_interface: str | None = None


def party_environment(config: PartyConfig) -> dict[str, str]:
    """CrypTen's communicator reads its rendezvous from the environment (``env://``)."""
    env = {
        "RENDEZVOUS": "env://",
        "MASTER_ADDR": config.master_addr,
        "MASTER_PORT": str(config.master_port),
        "WORLD_SIZE": str(config.world_size),
        "RANK": str(config.rank),
        "DISTRIBUTED_BACKEND": "gloo",
    }
    if config.gloo_interface:
        env["GLOO_SOCKET_IFNAME"] = config.gloo_interface
    return env


def party_main(config: PartyConfig, site: Connection) -> None:
    """Entry point of a party process; talks to its site over ``site`` until told to stop."""
    import torch

    # Several parties share few cores; more threads per party only contend.
    torch.set_num_threads(1)
    os.environ.update(party_environment(config))
    try:
        crypten = import_crypten()
        crypten.init()
        sender = FrameSender(
            config.server_address, config.key, {"type": "hello", "party": config.rank}, config.connect_timeout_s
        )
    except Exception as exc:  # reported to the site, which fails the run with this text
        site.send(("failed", _describe(exc)))
        return
    site.send(("ready", config.rank))
    exit_code = 0
    try:
        while True:
            try:
                message = site.recv()
            except (EOFError, OSError):
                break  # the site is gone; nothing left to share
            if message[0] == "stop":
                break
            _, round_, layout, update = message
            # Tells the watchdog this party took up the round, so a silent round names the straggler.
            site.send(("started", round_))
            try:
                _share_round(crypten, config, sender, round_, layout, update)
            except OverflowError as exc:
                site.send(("error", round_, "overflow", str(exc)))
            except RoundRefused as exc:
                site.send(("error", round_, "refused", str(exc)))
            except Exception as exc:
                site.send(("error", round_, "failed", _describe(exc)))
            else:
                site.send(("sent", round_))
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    finally:
        sender.close()
        # Skip crypten.uninit() and the interpreter's teardown: destroying the gloo process group
        # waits on peers (measured ~4 s per stop); the OS frees the sockets at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def _share_round(
    crypten: Any, config: PartyConfig, sender: FrameSender, round_: int, layout: VectorLayout, update: ClientUpdate | None
) -> None:
    import torch
    from crypten.mpc.primitives import ArithmeticSharedTensor

    communicator = crypten.communicator.get()
    vector = layout.flatten(update)
    problem: OverflowError | None = None
    try:
        check_range(vector, config.precision_bits, config.world_size)
        encoded = encode(vector, config.precision_bits)
    except OverflowError as exc:
        problem, encoded = exc, np.zeros(layout.length, dtype=np.int64)
    # Lockstep check before any sharing: same round, same layout, every input in range.
    mine = torch.tensor([round_, layout.digest(), int(problem is not None)], dtype=torch.long)
    everyone = [row.tolist() for row in communicator.all_gather(mine)]
    if problem is not None:
        raise problem
    if any(row[:2] != [round_, layout.digest()] for row in everyone):
        raise RuntimeError(f"parties disagree on the round or the update layout: {everyone}")
    refused = [rank for rank, row in enumerate(everyone) if row[2]]
    if refused:
        raise RoundRefused(f"party {refused} refused its update (fixed-point range); nothing was shared this round")
    size = (layout.length,)
    total = None
    for src in range(config.world_size):
        # precision=0: values arrive already fixed-point encoded (rounded, in float64), so
        # CrypTen's own float32 encoder never truncates them.
        mine_or_none = torch.from_numpy(encoded) if src == config.rank else None
        shared = ArithmeticSharedTensor(mine_or_none, size=size, precision=0, src=src)
        total = shared if total is None else total + shared
    assert total is not None
    header = {"type": "share", "round": round_, "party": config.rank, "length": layout.length}
    sender.send(header, int64_body(total.share.numpy()))


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"
