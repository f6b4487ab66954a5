"""``fedcore federation ...`` and ``fedcore site ...``: the deployment's commands."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import click

from fedcore.errors import RunFailure


@click.group()
def federation() -> None:
    """A federation over Flower's Deployment Engine: certificates, a local demo."""


@federation.command("certs")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory to write (CA, server, one folder per site)")
@click.option("--sites", required=True, help="comma-separated site names, e.g. hospital-0,hospital-1,hospital-2")
@click.option("--host", "hosts", multiple=True, help="a name or IP the SuperLink is reached at (repeatable; localhost is always in)")
def certs_command(out: Path, sites: str, hosts: tuple[str, ...]) -> None:
    """Write the federation's CA, the SuperLink's TLS pair and every site's keys."""
    from fedcore.plugins.deploy.certs import make_certs

    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty; certificates are never overwritten (choose a new --out)")
    certs = make_certs(out, sites.split(","), hosts)
    click.echo(f"wrote {certs.root}: give each hospital its own folder; keep ca.key offline")


@federation.command("demo-data")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory for the sites' tables and site files")
@click.option("--certs", "certs_dir", type=click.Path(path_type=Path), required=True, help="the federation's certificates")
@click.option("--sites", type=int, default=3, show_default=True)
@click.option("--patients", type=int, default=2000, show_default=True, help="patients per site")
@click.option("--seed", type=int, default=2024, show_default=True)
def demo_data(out: Path, certs_dir: Path, sites: int, patients: int, seed: int) -> None:
    """Write synthetic EHR tables, one per site, and each site's site.yaml (a local demo)."""
    from fedcore.plugins.deploy.demo import write_demo_sites

    for path in write_demo_sites(out, certs_dir, sites, patients, seed):
        click.echo(str(path))


@federation.command("up")
@click.option("--sites", type=int, default=None, help="number of sites (hospital-0..N-1); default: those in --certs")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True, help="holds <site>.yaml for every site")
@click.option("--certs", "certs_dir", type=click.Path(path_type=Path), default=Path("certs"), show_default=True)
@click.option("--state", type=click.Path(path_type=Path), default=Path("federation"), show_default=True, help="logs, databases, pids")
@click.option("--port", type=int, default=9092, show_default=True)
@click.option("--insecure", is_flag=True, help="no TLS, no node authentication (printed loudly)")
@click.option("--detach", is_flag=True, help="return once everything runs (stop with 'fedcore federation down')")
def up(sites: int | None, data_dir: Path, certs_dir: Path, state: Path, port: int, insecure: bool, detach: bool) -> None:
    """A local federation: Flower's SuperLink and one SuperNode per site, as processes."""
    from fedcore.plugins.deploy import require_flwr
    from fedcore.plugins.deploy.certs import FederationCerts, make_certs
    from fedcore.plugins.deploy.local import LocalFederation
    from fedcore.plugins.deploy.study import INSECURE_WARNING

    require_flwr()
    if not (certs_dir / "sites.json").exists():
        names = [f"hospital-{i}" for i in range(sites or 3)]
        make_certs(certs_dir, names)
        click.echo(f"wrote certificates for {', '.join(names)} to {certs_dir}")
    certs = FederationCerts(certs_dir)
    if sites is not None and sites != len(certs.registry()):
        raise click.ClickException(f"--sites {sites} but {certs_dir}/sites.json lists {len(certs.registry())} sites")
    if insecure:
        click.secho(INSECURE_WARNING, err=True, fg="red", bold=True)
    fed = LocalFederation(certs, state, port=port, insecure=insecure)
    try:
        fed.start(data_dir)
    except BaseException:
        fed.stop()
        raise
    click.echo(f"SuperLink {fed.address} (pid {fed.superlink.pid if fed.superlink else '?'}); "
               + ", ".join(f"{s} pid {n.pid}" for s, n in fed.nodes.items()))
    click.echo(f"run a study: fedcore run SPEC --federation {fed.address} --certs {certs_dir}")
    if detach:
        return
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            if fed.superlink is not None and not fed.superlink.alive():
                raise RunFailure(f"the SuperLink exited (log: {fed.superlink.log})")
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        fed.stop()


@federation.command("down")
@click.option("--state", type=click.Path(path_type=Path), default=Path("federation"), show_default=True)
def down(state: Path) -> None:
    """Stop the processes 'fedcore federation up --detach' started (by their pids)."""
    import json
    import os

    info = json.loads((state / "federation.json").read_text())
    pids = [*info.get("supernodes", {}).values(), info.get("superlink")]
    for pid in [p for p in pids if p]:
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            continue
    click.echo(f"stopped {len([p for p in pids if p])} processes")


@click.group()
def site() -> None:
    """A hospital's side: its SuperNode, next to its own data."""


@site.command("start")
@click.option("--superlink", required=True, help="the coordinator's SuperLink, HOST:PORT")
@click.option("--certs", "certs_dir", type=click.Path(path_type=Path), required=True, help="this site's folder from 'federation certs'")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="this site's site.yaml (its table and columns; never sent)")
@click.option("--insecure", is_flag=True, help="no TLS (printed loudly)")
@click.option("--reconnect-s", type=float, default=900.0, show_default=True, help="how long to keep reconnecting to a lost SuperLink")
def site_start(superlink: str, certs_dir: Path, data: Path, insecure: bool, reconnect_s: float) -> None:
    """Run this hospital's SuperNode (in the foreground) with fedcore's ClientApp."""
    from fedcore.plugins.deploy import require_flwr
    from fedcore.plugins.deploy.processes import check_superlink, flwr_env, supernode_with_executor
    from fedcore.plugins.deploy.site import load_site_config
    from fedcore.plugins.deploy.study import INSECURE_WARNING

    require_flwr()
    loaded = load_site_config(data)
    loaded.signing_key()
    for name in ("ca.crt", "node.key"):
        if not (certs_dir / name).is_file():
            raise click.ClickException(f"{certs_dir / name} is missing; give --certs this site's folder from 'fedcore federation certs'")
    if insecure:
        click.secho(INSECURE_WARNING, err=True, fg="red", bold=True)
    check_superlink(superlink, None if insecure else certs_dir / "ca.crt", f"site '{loaded.name}'")
    home = loaded.state_dir / "flwr-home"
    command, executor_of = supernode_with_executor(certs_dir.resolve(), superlink, loaded.source, loaded.name, home, insecure, wait_s=reconnect_s)
    process = subprocess.Popen(command, env=flwr_env(home))  # noqa: S603
    executor = subprocess.Popen(executor_of(process.pid), env=flwr_env(home))  # noqa: S603 - exits with the SuperNode
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    executor_code = None
    try:
        while (code := process.poll()) is None:
            if executor.poll() is not None and process.poll() is None:  # nobody would run the messages this node takes
                executor_code = executor.returncode
                process.terminate()
                code = process.wait(30)
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        process.terminate()
        code = process.wait(30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if executor.poll() is None:  # it would follow its SuperNode by itself, once its imports are done
        executor.terminate()
    try:
        executor.wait(10)
    except subprocess.TimeoutExpired:
        executor.kill()
    if executor_code is not None:
        raise RunFailure(
            f"site '{loaded.name}': its ClientApp executor stopped (exit {executor_code}), so its SuperNode was stopped too; "
            "its output is above (check this site's install: python -c 'import fedcore.plugins.deploy.client')"
        )
    if code not in (0, -signal.SIGTERM):
        raise RunFailure(
            f"site '{loaded.name}': its SuperNode stopped (exit {code}); if the SuperLink refused it, register this site's "
            "node.pub at the coordinator (it is in sites.json), else check --superlink and --certs"
        )









@federation.command("register")
@click.option("--superlink", required=True, help="the SuperLink's HOST:PORT")
@click.option("--certs", "certs_dir", type=click.Path(path_type=Path), required=True, help="the coordinator's certificates (sites.json)")
def register(superlink: str, certs_dir: Path) -> None:
    """Register every site's SuperNode key of sites.json with the SuperLink (only these may connect)."""
    from fedcore.plugins.deploy import require_flwr
    from fedcore.plugins.deploy.certs import FederationCerts
    from fedcore.plugins.deploy.control import control_client, register_sites
    from fedcore.plugins.deploy.processes import check_superlink

    require_flwr()
    certs = FederationCerts(certs_dir)
    check_superlink(superlink, certs.ca, "coordinator")
    nodes = register_sites(control_client(superlink, certs.ca), certs)
    click.echo(", ".join(f"{s}: node {n}" for s, n in nodes.items()))
