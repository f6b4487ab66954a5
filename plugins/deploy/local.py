"""A whole federation on one machine (``fedcore federation up``): SuperLink + one SuperNode per site.

Each process is Flower's own binary, started by pid, with TLS and SuperNode
authentication on; this is the layout of a real network, on loopback (or, in
the tests, in separate network namespaces).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.plugins.deploy.certs import FederationCerts
from fedcore.plugins.deploy.control import control_client, register_sites
from fedcore.plugins.deploy.processes import (
    FlowerProcess,
    last_line,
    launch,
    superlink_command,
    supernode_with_executor,
    wait_listening,
    wait_log,
)
from fedcore.errors import DataError, RunFailure

STATE_FILE = "federation.json"


def start_superlink(
    certs: FederationCerts, state: Path, host: str, port: int, insecure: bool = False, timeout_s: float = 60.0, prefix: Sequence[str] = ()
) -> FlowerProcess:
    """Flower's SuperLink with TLS, SuperNode auth and ``state/superlink.db`` (it survives restarts)."""
    state.mkdir(parents=True, exist_ok=True)
    command = superlink_command(None if insecure else certs.root.resolve(), (state / "superlink.db").resolve(), host, port, insecure)
    process = launch("SuperLink", command, state / "superlink.log", state / "superlink-home", prefix)
    if prefix:  # in another network namespace: its port is not reachable from here; wait for its log line
        wait_log(process, "Uvicorn running on", timeout_s)
    else:
        wait_listening(process, "127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout_s)
    return process


def start_supernode(
    certs: FederationCerts,
    site: str,
    data: Path,
    superlink: str,
    state: Path,
    insecure: bool = False,
    port: int | None = None,
    prefix: Sequence[str] = (),
) -> FlowerProcess:
    """One hospital's SuperNode: its own key, its own data file (read only at the site), its own FLWR_HOME,
    and fedcore's warm executor beside it (:mod:`fedcore.plugins.deploy.executor`)."""
    if not data.is_file():
        raise DataError(f"site '{site}' has no site file", where=str(data), hint="write its site.yaml (see docs/deployment.md)")
    home = state / f"{site}-home"
    command, executor = supernode_with_executor(certs.site(site).resolve(), superlink, data.resolve(), site, home, insecure, port)
    return launch(f"SuperNode of '{site}'", command, state / f"{site}.log", home, prefix, companion=executor)


@dataclass
class LocalFederation:
    """SuperLink and SuperNodes as local processes; :meth:`stop` ends exactly those, by pid."""

    certs: FederationCerts
    state: Path
    host: str = "127.0.0.1"
    port: int = 9092
    insecure: bool = False
    superlink: FlowerProcess | None = None
    nodes: dict[str, FlowerProcess] = field(default_factory=dict)
    #: the command prefix per process ("superlink" or a site name), e.g. ``ip netns exec NS`` (tests)
    prefixes: Callable[[str], Sequence[str]] = lambda _: ()

    @property
    def address(self) -> str:
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    def start_link(self) -> None:
        self.superlink = start_superlink(self.certs, self.state, self.host, self.port, self.insecure, prefix=self.prefixes("superlink"))
        if not self.prefixes("superlink"):
            client = control_client(self.address, None if self.insecure else self.certs.ca)
            register_sites(client, self.certs)

    def start_node(self, site: str, data: Path) -> FlowerProcess:
        self.nodes[site] = start_supernode(
            self.certs, site, data, self.address, self.state, self.insecure, prefix=self.prefixes(site)
        )
        return self.nodes[site]

    def start(self, data_dir: Path, settle_s: float = 3.0) -> None:
        """The SuperLink, then a SuperNode per site in ``sites.json`` with ``data_dir/<site>.yaml``."""
        self.start_link()
        for site in sorted(self.certs.registry()):
            self.start_node(site, data_dir / f"{site}.yaml")
        time.sleep(settle_s)
        for site, node in self.nodes.items():
            if not node.alive():
                self.stop()
                what = "SuperNode" if node.popen.returncode is not None else "ClientApp executor"
                raise RunFailure(f"the {what} of '{site}' exited at start ({last_line(node.log)}; log: {node.log})")
        self.write_state()

    def write_state(self) -> None:
        pids = {"superlink": self.superlink.pid if self.superlink else None, "supernodes": {s: n.pid for s, n in self.nodes.items()}}
        (self.state / STATE_FILE).write_text(json.dumps({"address": self.address, **pids}, indent=1))

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        if self.superlink is not None:
            self.superlink.stop()
