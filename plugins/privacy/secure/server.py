"""The server as its own OS process, for checking what it receives.

The simulation engine keeps sites and server in one process. To show that
under secure aggregation no individual update reaches the server, this module
runs the server side alone in a process: it listens on loopback, records every
byte it reads (:class:`~.channel.FrameReceiver` ``capture``), turns what it got
into new global weights with a real aggregator plugin, and sends the weights
back to the sites (the broadcast). It has two modes:

- ``secure``: the CrypTen parties send it their shares of the sum;
- ``plain``: each site sends it its update (secure aggregation off), the
  control that proves the audit in :mod:`.audit` can fail.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from fedcore.components import plain_sum
from fedcore.plugins.privacy.secure.channel import FrameReceiver, FrameSender, int64_from_body
from fedcore.plugins.privacy.secure.fixed_point import VectorLayout, sum_from_shares
from fedcore.types import ClientUpdate, Weights


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process starts from (no site data, no updates)."""

    mode: Literal["secure", "plain"]
    n_sites: int
    key: bytes
    precision_bits: int
    aggregator: dict[str, Any]
    """The aggregator's plugin reference, ``{"use": ..., "settings": {...}}``."""
    initial: Weights
    rounds: int
    capture: Path
    timeout_s: float = 60.0


def serve(config: ServerConfig, sites: Connection) -> None:
    """Entry point of the server process; ``sites`` carries only the global-weights broadcast."""
    import torch

    from fedcore.registry import PluginManager
    from fedcore.spec import PluginRef, instantiate

    torch.set_num_threads(1)
    receiver = FrameReceiver(config.n_sites, config.key, capture=config.capture)
    try:
        sites.send(("address", receiver.address))
        receiver.accept("party" if config.mode == "secure" else "site", time.monotonic() + config.timeout_s)
        aggregator = instantiate(PluginRef.model_validate(config.aggregator), "aggregator", PluginManager())
        weights = config.initial
        layout = VectorLayout.of(config.initial)
        for round_ in range(1, config.rounds + 1):
            deadline = time.monotonic() + config.timeout_s
            if config.mode == "secure":
                frames = receiver.receive_round("share", round_, deadline)
                shares = [int64_from_body(frames[p][1]) for p in sorted(frames)]
                summed = sum_from_shares(round_, layout, shares, config.precision_bits)
            else:
                frames = receiver.receive_round("update", round_, deadline)
                updates = [
                    ClientUpdate(site=s, round=round_, delta=Weights.from_bytes(body), n_samples=header["n_samples"])
                    for s, (header, body) in sorted(frames.items())
                ]
                summed = plain_sum(round_, updates)
            weights = aggregator.aggregate_sum(round_, weights, summed)  # type: ignore[attr-defined]
            sites.send(("weights", round_, weights))
    except Exception as exc:  # the driver reports it; the process must not hang
        sites.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        receiver.close()


class ServerProcess:
    """Starts :func:`serve` in a spawned process and relays its broadcasts."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        ctx = mp.get_context("spawn")
        self._conn, theirs = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=serve, args=(config, theirs), name="fedcore-server", daemon=True)
        self._process.start()
        theirs.close()
        self.address: tuple[str, int] = tuple(self._expect("address")[1])  # type: ignore[assignment]

    def next_weights(self, round: int) -> Weights:
        """The global weights the server broadcasts after ``round``."""
        message = self._expect("weights")
        if message[1] != round:
            raise RuntimeError(f"server sent weights of round {message[1]}, expected {round}")
        return message[2]

    def _expect(self, kind: str) -> tuple[Any, ...]:
        if not self._conn.poll(self.config.timeout_s):
            raise TimeoutError(f"the server process sent no {kind} within {self.config.timeout_s:g} s")
        message = self._conn.recv()
        if message[0] == "error":
            raise RuntimeError(f"the server process failed: {message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"the server process sent {message[0]!r}, expected {kind!r}")
        return message

    def stop(self) -> None:
        self._process.join(5.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(1.0)
        self._conn.close()


class PlainSiteLink:
    """Secure aggregation off: a site sends its own update straight to the server."""

    def __init__(self, site: int, address: tuple[str, int], key: bytes, timeout_s: float = 30.0) -> None:
        self.site = site
        self._sender = FrameSender(address, key, {"type": "hello", "site": site}, timeout_s)

    def send(self, update: ClientUpdate) -> None:
        header = {"type": "update", "round": update.round, "site": update.site, "n_samples": update.n_samples}
        self._sender.send(header, update.delta.to_bytes())

    def close(self) -> None:
        self._sender.close()
