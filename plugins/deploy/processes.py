"""Starting, checking and stopping Flower's own SuperLink and SuperNode processes, by pid.

Every wait has a timeout; a process that dies while we wait is reported with
the last line of its log. Processes run in their own session (process group),
so stopping one stops the Flower subprocesses it started (SuperExec, apps).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.errors import DataError, RunFailure
from fedcore.plugins.deploy import transport


def flwr_env(home: Path) -> dict[str, str]:
    """The environment of a Flower process: this Python's scripts first on PATH, its own FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # A SuperNode's SuperExec asks its SuperNode for a ClientApp task every second by default: a local
    # call (no bytes on the site's link), so asking more often only starts each message's ClientApp sooner.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    # Flower reports usage events to telemetry.flower.ai unless told not to: a hospital's node and the
    # coordinator talk to each other only (set FLWR_TELEMETRY_ENABLED=1 yourself to opt in).
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def split_address(address: str, where: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DataError(f"'{address}' is not HOST:PORT", where=where, hint="give the SuperLink's address, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith(" ")]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


@dataclass
class FlowerProcess:
    """A Flower process we started: its pid, log file and what it is."""

    what: str
    popen: subprocess.Popen[bytes]
    log: Path
    #: processes that serve this one and exit when it does (a SuperNode's executor)
    companions: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """It runs, and so do its companions (a SuperNode whose executor died would take messages it never runs)."""
        return self.popen.poll() is None and all(c.poll() is None for c in self.companions)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to its process group (then its companions'), SIGKILL after ``timeout_s``."""
        for popen in (self.popen, *self.companions):
            _stop_group(popen, timeout_s)

    def kill(self) -> None:
        """SIGKILL the process itself (a crash, as a dropout test wants); its children follow their parent."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def _stop_group(popen: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM to ``popen``'s process group, SIGKILL after ``timeout_s``."""
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(10)


def launch(
    what: str,
    command: list[str],
    log: Path,
    home: Path,
    prefix: Sequence[str] = (),
    companion: Callable[[int], list[str]] | None = None,
) -> FlowerProcess:
    """Start ``command`` in its own session, output to ``log``; ``prefix`` wraps it (e.g. ``ip netns exec NS``).

    ``companion(pid)``, when given, is the command of a process that serves this one (a SuperNode's
    executor): started next, with the same environment and log; it exits by itself when this one is
    gone, and :meth:`FlowerProcess.stop` stops it too.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    env = flwr_env(home)
    with open(log, "ab") as handle:
        popen = subprocess.Popen(  # noqa: S603 - our own argument list, no shell
            [*prefix, *command], stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=home
        )
        companions = []
        if companion is not None:
            companions.append(subprocess.Popen(  # noqa: S603
                [*prefix, *companion(popen.pid)], stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=home
            ))
    return FlowerProcess(what, popen, log, companions)


def superlink_command(
    certs_dir: Path | None, database: Path, host: str, port: int, insecure: bool = False
) -> list[str]:
    """``flower-superlink`` with TLS (unless ``insecure``), SuperNode authentication and a database that survives restarts
    (through :mod:`fedcore.plugins.deploy.transport`: idle connections kept open, fewer header bytes)."""
    command = [*transport.command("flower-superlink"), "--database", str(database), "--host", host, "--port", str(port)]
    command += ["--disable-runtime-dependency-installation"]
    if insecure:
        command += ["--insecure"]
    else:
        assert certs_dir is not None
        command += [
            "--ssl-ca-certfile", str(certs_dir / "ca.crt"),
            "--ssl-certfile", str(certs_dir / "server.crt"),
            "--ssl-keyfile", str(certs_dir / "server.key"),
            "--enable-supernode-auth",
        ]
    return command


def supernode_command(
    site_certs: Path,
    superlink: str,
    data: Path,
    site: str,
    port: int,
    insecure: bool = False,
    retries: int | None = None,
    wait_s: float = 900.0,
    executor_secret: Path | None = None,
) -> list[str]:
    """``flower-supernode`` for one hospital: TLS to the SuperLink, its own auth key, its own data file.

    A hospital's node outlives a coordinator restart: it keeps reconnecting for up
    to ``wait_s`` seconds (``retries`` bounds the attempts too, when given). With
    ``executor_secret`` it runs in Flower's ``process`` isolation: its ClientApps are
    started by fedcore's warm executor (:mod:`fedcore.plugins.deploy.executor`, see
    :func:`site_executor`), which must present that secret; without it, by Flower's own
    SuperExec (a fresh ``flwr-clientapp`` process per message). It runs through
    :mod:`fedcore.plugins.deploy.transport` (one connection kept open, fewer header bytes).
    """
    command = [
        *transport.command("flower-supernode"), "--superlink", superlink, "--port", str(port),
        "--node-config", f"data='{data}' site='{site}'", "--max-wait-time", str(wait_s),
    ]
    if executor_secret is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(executor_secret)]
    if retries is not None:
        command += ["--max-retries", str(retries)]
    if insecure:
        command += ["--insecure"]  # Flower refuses SuperNode authentication without TLS
    else:
        command += ["--root-certificates", str(site_certs / "ca.crt")]
        command += ["--auth-supernode-private-key", str(site_certs / "node.key")]
    return command


def write_executor_secret(path: Path) -> Path:
    """A fresh random secret (owner-only file) that the SuperNode and its executor share; its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(32))
    return path


def site_executor(port: int, secret: Path) -> Callable[[int], list[str]]:
    """The warm executor's command for the SuperNode with Runtime API ``port`` and pid given (a :func:`launch` companion)."""
    from fedcore.plugins.deploy.executor import executor_command

    return lambda supernode_pid: executor_command(f"127.0.0.1:{port}", secret, supernode_pid)


def supernode_with_executor(
    site_certs: Path,
    superlink: str,
    data: Path,
    site: str,
    home: Path,
    insecure: bool = False,
    port: int | None = None,
    wait_s: float = 900.0,
) -> tuple[list[str], Callable[[int], list[str]]]:
    """A hospital's SuperNode command (Runtime API on ``port``, a free one by default) and its warm
    executor's (a :func:`launch` companion), sharing a fresh secret in ``home``."""
    port = port or free_port()
    secret = write_executor_secret(home / "superexec.secret").resolve()
    command = supernode_command(site_certs, superlink, data, site, port, insecure, wait_s=wait_s, executor_secret=secret)
    return command, site_executor(port, secret)


def wait_listening(process: FlowerProcess, host: str, port: int, timeout_s: float) -> None:
    """Wait until ``host:port`` accepts connections; fail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise RunFailure(f"{process.what} exited (code {process.popen.returncode}): {last_line(process.log)} (log: {process.log})")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise RunFailure(f"{process.what} did not listen on {host}:{port} within {timeout_s:g}s (log: {process.log})")


def check_superlink(address: str, ca: Path | None, who: str, timeout_s: float = 10.0) -> None:
    """A TLS handshake with the SuperLink: one line for an unreachable address or wrong certificates."""
    host, port = split_address(address, "--superlink")
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise RunFailure(
            f"{who}: cannot reach the SuperLink at {address} ({exc.strerror or exc}) — check the address and that the SuperLink runs"
        ) from None
    with sock:
        if ca is None:
            return
        try:
            context = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise DataError(f"{who}: cannot read the CA certificate ({exc})", where=str(ca), hint="point --certs at the federation's certificates") from None
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                tls.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            raise DataError(
                f"{who}: the SuperLink at {address} presents a certificate this CA does not vouch for ({exc.verify_message})",
                where=str(ca),
                hint="use the ca.crt of the federation that SuperLink belongs to (fedcore federation certs)",
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise RunFailure(f"{who}: TLS with the SuperLink at {address} failed ({exc}) — is it running with TLS?") from None


def wait_log(process: FlowerProcess, text: str, timeout_s: float) -> None:
    """Wait until ``text`` appears in the process's log; fail if it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise RunFailure(f"{process.what} exited (code {process.popen.returncode}): {last_line(process.log)} (log: {process.log})")
        try:
            if text in process.log.read_text(errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RunFailure(f"{process.what} did not start within {timeout_s:g}s (log: {process.log})")
