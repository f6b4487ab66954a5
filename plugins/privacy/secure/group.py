"""The party processes of one run, under a watchdog.

gloo's process-group setup and collectives wait up to 30 minutes for a missing
peer, so nothing here ever waits without a deadline: every wait also watches
the parties' process sentinels, and a party that dies, fails or stays silent
past its deadline stops the whole group and raises :class:`PartyFailure` at once.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import socket
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from typing import Any

from fedcore.errors import RunFailure
from fedcore.plugins.privacy.secure.fixed_point import VectorLayout
from fedcore.plugins.privacy.secure.party import PartyConfig, party_main
from fedcore.types import ClientUpdate

_STOP_GRACE_SECONDS = 2.0


class PartyFailure(RunFailure, RuntimeError):
    """A secure-aggregation party died, failed or did not answer in time; the round cannot complete."""


class RangeError(RuntimeError):
    """A site's weighted update does not fit the fixed-point range (lower ``precision_bits``).

    Every party skipped the round together, so the group keeps running.
    """


def free_port(host: str) -> int:
    """A TCP port free right now on ``host`` (for the rendezvous when none is configured)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PartyGroup:
    """One CrypTen party process per site; each receives only its own site's update."""

    def __init__(
        self,
        n_parties: int,
        *,
        server_address: tuple[str, int],
        key: bytes,
        precision_bits: int,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
        gloo_interface: str | None = None,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.n_parties = n_parties
        port = master_port or free_port(master_addr)
        self._configs = [
            PartyConfig(
                rank=rank,
                world_size=n_parties,
                master_addr=master_addr,
                master_port=port,
                server_address=server_address,
                key=key,
                precision_bits=precision_bits,
                connect_timeout_s=connect_timeout_s,
                gloo_interface=gloo_interface,
            )
            for rank in range(n_parties)
        ]
        self._processes: list[Any] = []
        self._pipes: list[Connection] = []
        self._phase = "start-up"
        self.closed = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def start(self, timeout_s: float) -> None:
        """Spawn every party and wait until each has joined CrypTen and connected to the server."""
        self.launch()
        self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Spawn every party and return at once (their start-up can overlap the first round's training)."""
        # A fork server (a clean single-threaded process, never the caller: fork would copy its torch
        # threads and sockets) imports torch and CrypTen once; every party is forked from it.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["fedcore.plugins.privacy.secure.preload"])
        for config in self._configs:
            ours, theirs = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=party_main, args=(config, theirs), name=f"crypten-party-{config.rank}", daemon=True
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            self._pipes.append(ours)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until every launched party has joined CrypTen and connected to the server."""
        self._collect("ready", None, time.monotonic() + timeout_s, f"start-up ({timeout_s:g} s)")

    def submit(self, round: int, layout: VectorLayout, updates: Mapping[int, ClientUpdate], timeout_s: float) -> None:
        """Hand each party its own site's update (or nothing) and wait until its share is sent."""
        self._phase = f"round {round}"
        for rank, pipe in enumerate(self._pipes):
            try:
                pipe.send(("round", round, layout, updates.get(rank)))
            except OSError:
                self.check_alive()
                self._fail(f"party {rank} (site {rank}) stopped listening in round {round}")
        self._collect("sent", round, time.monotonic() + timeout_s, f"round {round} ({timeout_s:g} s)")

    def check_alive(self) -> None:
        """Raise :class:`PartyFailure` (after stopping the others) when a party has exited."""
        for rank, process in enumerate(self._processes):
            if process.exitcode is not None:
                self._fail(f"party {rank} (site {rank}) died during {self._phase} ({_exit_text(process.exitcode)})")

    def _collect(self, expected: str, round: int | None, deadline: float, what: str) -> None:
        """Wait for every party's answer; stop the group on death, silence or failure.

        An out-of-range input is the one error that leaves the parties in step (they all
        skipped the round together), so it raises :class:`RangeError` with the group running.
        """
        waiting = dict(enumerate(self._pipes))
        started: set[int] = set()
        answers: dict[int, tuple[Any, ...]] = {}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(_silence(sorted(waiting), started, what))
            sentinels = {self._processes[r].sentinel: r for r in waiting}
            ready = wait([*waiting.values(), *sentinels], timeout=remaining)
            for rank, pipe in list(waiting.items()):
                # A message sent just before a party exited is still in its pipe: read it first.
                if not pipe.poll():
                    if self._processes[rank].sentinel in ready:
                        self._processes[rank].join(0.1)
                        self._fail(f"party {rank} (site {rank}) died during {what} ({_exit_text(self._processes[rank].exitcode)})")
                    continue
                try:
                    message = pipe.recv()
                except (EOFError, OSError):
                    self._processes[rank].join(0.5)
                    self._fail(f"party {rank} (site {rank}) died during {what} ({_exit_text(self._processes[rank].exitcode)})")
                if message[0] == "started" and message[1] == round:
                    started.add(rank)
                    continue
                answers[rank] = message
                del waiting[rank]
        problems = {r: m for r, m in answers.items() if not (m[0] == expected and (round is None or m[1] == round))}
        if not problems:
            return
        overflow = {r: m for r, m in problems.items() if m[0] == "error" and m[2] == "overflow"}
        if overflow and all(m[0] == "error" and m[2] in ("overflow", "refused") for m in problems.values()):
            rank, message = min(overflow.items())
            raise RangeError(f"party {rank} (site {rank}) refused its update in {what}: {message[3]}")
        rank, message = min(problems.items())
        if message[0] == "error":
            self._fail(f"party {rank} (site {rank}) failed in {what}: {message[3]}")
        if message[0] == "failed":
            self._fail(f"party {rank} (site {rank}) could not start: {message[1]}")
        self._fail(f"party {rank} (site {rank}) sent an unexpected message during {what}: {message[0]!r}")

    def _fail(self, reason: str, kind: type[PartyFailure] = PartyFailure) -> None:
        self.close()
        raise kind(f"secure aggregation stopped: {reason}; all parties were stopped")

    def close(self) -> None:
        """Stop every party: ask politely, then terminate, then kill. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for pipe in self._pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for pipe in self._pipes:
            pipe.close()


def _silence(silent: list[int], started: set[int], what: str) -> str:
    stragglers = [r for r in silent if r not in started] or silent
    text = "no answer from " + ", ".join(f"party {r} (site {r})" for r in stragglers)
    text += f" within the {what} timeout"
    blocked = [r for r in silent if r not in stragglers]
    if blocked:
        text += f"; parties {', '.join(map(str, blocked))} were waiting for it in the computation"
    return text


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
