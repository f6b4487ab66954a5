"""``fedcore fabric build|up|down|status|stop-node|start-node``: the local Fabric network (docs/ledger.md)."""

from __future__ import annotations

import json
from pathlib import Path

import click

_dir_option = click.option(
    "--dir", "directory", type=click.Path(path_type=Path), default=None,
    help="network directory (default ~/.local/state/fedcore/fabric-network, or $FEDCORE_FABRIC_NETWORK)",
)


@click.group()
def fabric() -> None:
    """A local Hyperledger Fabric network with SmartBFT ordering (4 organizations on loopback)."""


@fabric.command("build")
@click.option("--force", is_flag=True, help="rebuild even if the binaries are cached")
def build_command(force: bool) -> None:
    """Build Fabric's peer, orderer, osnadmin and configtxgen from its Go module, once per version."""
    from fedcore.plugins.ledgers.fabric.network import build

    build(log=click.echo, force=force)


@fabric.command("up")
@_dir_option
@click.option("--sites", type=int, default=3, show_default=True, help="hospital organizations (plus the coordinator's)")
@click.option("--base-port", type=int, default=None, help="first of the network's loopback ports (default 17050)")
@click.option("--fresh", is_flag=True, help="discard the existing network's ledgers and crypto material")
def up_command(directory: Path | None, sites: int, base_port: int | None, fresh: bool) -> None:
    """Start the network (create it first if there is none); refuses over a running one."""
    from fedcore.plugins.ledgers.fabric.network import DEFAULT_BASE_PORT, LocalNetwork

    network = LocalNetwork(directory, sites, base_port or DEFAULT_BASE_PORT, keep_layout=not fresh)
    network.up(log=click.echo, fresh=fresh)
    click.echo(f"ledger settings: {{use: fabric, settings: {{network: {network.root}}}}} (or network: local)")


@fabric.command("down")
@_dir_option
def down_command(directory: Path | None) -> None:
    """Stop every process the network started (by pid), stale ones included; keeps its ledgers."""
    from fedcore.plugins.ledgers.fabric.network import LocalNetwork

    stopped = LocalNetwork(directory).down()
    click.echo(f"stopped {len(stopped)} processes" + (f": {', '.join(stopped)}" if stopped else ""))


@fabric.command("status")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
def status_command(directory: Path | None, as_json: bool) -> None:
    """Which nodes run (pid, ports, log) and whether the orderers have a BFT quorum."""
    from fedcore.plugins.ledgers.fabric.network import LocalNetwork

    status = LocalNetwork(directory).status()
    if as_json:
        click.echo(json.dumps(status, indent=1))
        return
    click.echo(f"network {status['dir']} ({'set up' if status['ready'] else 'not set up'})")
    for name, node in status["nodes"].items():
        state = f"running pid {node['pid']}" if node["running"] else "stopped"
        click.echo(f"  {name:<24} {state:<20} ports {node['ports'] or '-'}")
    quorum = "yes" if status["orderers_running"] >= status["quorum"] else "NO: ordering halts"
    click.echo(f"orderers running {status['orderers_running']}/{status['orderers']}, "
               f"BFT quorum {status['quorum']}: {quorum}")


@fabric.command("stop-node")
@_dir_option
@click.argument("name")
def stop_node_command(directory: Path | None, name: str) -> None:
    """Stop one node by its pid (e.g. orderer.site-2), to watch BFT tolerate it."""
    from fedcore.plugins.ledgers.fabric.network import LocalNetwork

    click.echo(f"stopped {name}" if LocalNetwork(directory).stop_node(name) else f"{name} was not running")


@fabric.command("start-node")
@_dir_option
@click.argument("name")
def start_node_command(directory: Path | None, name: str) -> None:
    """Start one stopped node again; it catches up with the channel."""
    from fedcore.plugins.ledgers.fabric.network import LocalNetwork

    LocalNetwork(directory).start_node(name)
    click.echo(f"started {name}")
