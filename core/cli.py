"""The ``fedcore`` command line: run, validate, plugins, report, ledger verify.

Exit codes: 0 success, 1 internal error (or a ledger that fails verification),
2 user error (spec, data, plugin), always as one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import click

from fedcore.errors import FedcoreUserError, RunFailure
from fedcore.rundir import describe_job, read_status, write_error_log


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM, kept from click (which would print a bare 'Aborted!')."""


class _Group(click.Group):
    """Turns every error into one line and the documented exit code."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted() from exc

    def main(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except FedcoreUserError as exc:
            click.echo(f"error: {exc}{_in_run(exc)}", err=True)
            sys.exit(2)
        except RunFailure as exc:
            click.echo(f"run failed: {exc}{_in_run(exc)}", err=True)
            sys.exit(1)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, _Interrupted) as exc:
            click.echo(f"interrupted{_in_run(exc.__cause__ or exc)}", err=True)
            sys.exit(130)
        except Exception as exc:  # internal error: one line, details in a log file
            run_dir = getattr(exc, "fedcore_run_dir", None)
            if getattr(exc, "fedcore_logged", False):
                where = f" (traceback in {run_dir}/{(read_status(run_dir) or {}).get('log', 'error.log')})"
            else:
                try:
                    where = f" (traceback in {write_error_log(run_dir, traceback.format_exc())})"
                except OSError:
                    where = ""
            text = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"internal error: {type(exc).__name__}: {text}{_in_run(exc)}{where}", err=True)
            sys.exit(1)


def _in_run(exc: BaseException) -> str:
    """Which training failed and where its run directory is, for an error raised during a run."""
    run_dir = getattr(exc, "fedcore_run_dir", None)
    if run_dir is None:
        return ""
    status = read_status(run_dir) or {}
    return f"{describe_job(status.get('job'))} [run {run_dir} is {status.get('state', 'failed')}]"


def _terminate_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop) ends a run as Ctrl-C does: status ``interrupted``, workers killed."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@click.group(cls=_Group)
@click.version_option(package_name="fedcore")
def cli() -> None:
    """fedcore: privacy-preserving federated learning across hospitals."""


_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PATH=VALUE",
    help="override a spec value, e.g. --set training.rounds=3 or --set privacy.0.settings.epsilon=2",
)


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path), required=False)
@_set_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="run directory (default runs/NAME-TIME)")
@click.option("--workers", type=int, default=None, help="parallel worker processes (default: spec, else CPU cores)")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--federation", default=None, metavar="HOST:PORT", help="run on a deployed federation's SuperLink (docs/deployment.md)")
@click.option("--certs", type=click.Path(path_type=Path), default=None, help="with --federation: the coordinator's certificates")
@click.option("--insecure", is_flag=True, help="with --federation: no TLS, no node authentication (printed loudly)")
@click.option("--timeout", "timeout_s", type=float, default=None, help="with --federation: give up after this many seconds")
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    default=None,
    help="continue this run directory from its last complete round (alone; with --federation: that study)",
)
def run(
    spec: Path | None,
    overrides: tuple[str, ...],
    out: Path | None,
    workers: int | None,
    no_progress: bool,
    federation: str | None,
    certs: Path | None,
    insecure: bool,
    timeout_s: float | None,
    resume: Path | None,
) -> None:
    """Run the experiment SPEC and write its report (a simulation, or on a federation with --federation).

    ``fedcore run --resume RUN_DIR`` continues a simulated run that stopped (docs/reliability.md).
    """
    from fedcore.engine.runner import resume_experiment, run_experiment
    from fedcore.spec import load_experiment

    if federation is None and resume is not None:
        if spec is not None or overrides or out is not None:
            raise FedcoreUserError(
                "--resume continues a run with its own spec.resolved.yaml and directory",
                hint="use 'fedcore run --resume RUN_DIR' without SPEC, --set or --out",
            )
        _terminate_on_sigterm()
        run_dir = resume_experiment(resume, workers=workers, progress=False if no_progress else None)
        click.echo(f"report: {run_dir / 'report.md'}")
        return
    if spec is None and resume is None:
        raise FedcoreUserError("fedcore run needs a SPEC file (or --resume RUN_DIR)", hint="e.g. fedcore run specs/paper.yaml")
    if federation is not None:
        run_study = _deployment("run")
        if certs is None:
            raise FedcoreUserError("--federation needs --certs (the directory from 'fedcore federation certs')")
        run_dir = run_study(spec, overrides, federation, certs, out, insecure, timeout_s=timeout_s, resume=resume)
        click.echo(f"report: {run_dir / 'report.md'}")
        return

    experiment = load_experiment(spec, overrides)
    if out is not None:
        _check_out(out)
    _terminate_on_sigterm()
    run_dir = run_experiment(experiment, out=out, workers=workers, progress=False if no_progress else None)
    click.echo(f"report: {run_dir / 'report.md'}")


def _check_out(out: Path) -> None:
    """``--out`` must be a new or empty directory the run can write."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FedcoreUserError(f"--out {out} exists and is not a directory", hint="choose a new --out directory")
    if out.exists() and any(out.iterdir()):
        raise FedcoreUserError(f"output directory {out} is not empty", hint="choose a new --out directory")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path.cwd())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FedcoreUserError(f"cannot create --out {out}: {parent} is not writable", hint="choose a writable directory")


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@_set_option
@click.option("--quick", is_flag=True, help="check the spec only: skip reading data and calibrating budgets")
def validate(spec: Path, overrides: tuple[str, ...], quick: bool) -> None:
    """Check SPEC (keys, types, plugins, settings, compatibility, data, budgets) without training.

    Makes every check `fedcore run` makes before its first round: it reads the data and
    calibrates every privacy budget, as the run would.
    """
    from fedcore.engine.runner import preflight
    from fedcore.spec import load_experiment

    experiment = load_experiment(spec, overrides)
    if not quick:
        preflight(experiment)
    arms = len(experiment.arms)
    click.echo(f"{spec}: valid ({arms} arm{'s' if arms != 1 else ''} x {experiment.spec.repeats} repeat(s))")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json: bool) -> None:
    """List installed plugin components: kind, name, distribution, version, status."""
    from fedcore.registry import KIND_LABELS, PluginManager

    manager = PluginManager()
    rows = []
    for entry in manager.entries():
        reason = entry.unavailable_reason
        rows.append(
            {
                "kind": KIND_LABELS[entry.kind],
                "name": entry.name,
                "distribution": entry.distribution,
                "version": entry.version,
                "status": "available" if reason is None else f"unavailable: {reason}",
            }
        )
    for (kind, name), entries in manager.conflicts.items():
        for entry in entries:
            rows.append(
                {
                    "kind": KIND_LABELS[kind],
                    "name": name,
                    "distribution": entry.distribution,
                    "version": entry.version,
                    "status": "conflict: same name in several plugins",
                }
            )
    for failure in manager.failures:
        rows.append(
            {
                "kind": "-",
                "name": failure.plugin,
                "distribution": failure.distribution,
                "version": failure.version,
                "status": f"failed to load: {failure.error}",
            }
        )
    for blocked in manager.blocked:
        rows.append({"kind": "-", "name": blocked, "distribution": "-", "version": "-", "status": "blocked"})
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "name", "distribution", "version", "status")
    for row in rows:
        table.add_row(*row.values())
    Console(width=160).print(table)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Rebuild RUN_DIR's report.md and figures from its files."""
    from fedcore.report import build_report

    if not run_dir.is_dir():
        raise FedcoreUserError(f"run directory not found: {run_dir}", hint="pass a directory written by `fedcore run`")
    click.echo(f"report: {build_report(run_dir)}")


@cli.group()
def ledger() -> None:
    """Audit-ledger commands."""


@ledger.command("verify")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--keys", type=click.Path(path_type=Path), default=None, help="expected public keys (trust anchors)")
@click.option("--head", default=None, metavar="SEQ:HASH", help="the last signed head you received")
@click.option("--ledger", "ledger_name", default=None, help="ledger plugin name (default: from the run's spec)")
@click.option(
    "--openings", type=click.Path(path_type=Path), default=None, help="a party's openings folder: check its commitments"
)
def ledger_verify(target: Path, keys: Path | None, head: str | None, ledger_name: str | None, openings: Path | None) -> None:
    """Recompute the chain and every signature of TARGET (a run directory or ledger file)."""
    from fedcore.registry import PluginManager

    if not target.exists():
        raise FedcoreUserError(f"not found: {target}", hint="pass a run directory or a ledger file")
    manager = PluginManager()
    name = ledger_name or _ledger_name_of(target)
    if name is None:
        choices = manager.names("ledger")
        if len(choices) != 1:
            raise FedcoreUserError(
                f"cannot tell which ledger wrote {target}", hint=f"pass --ledger NAME (one of: {', '.join(choices)})"
            )
        name = choices[0]
    cls = manager.get("ledger", name, where="--ledger")
    result = cls.verify(target, keys=keys, head=head)  # type: ignore[attr-defined]
    if not result.ok:
        click.echo(f"TAMPERED: entry {result.first_bad_sequence}: {result.message}", err=True)
        sys.exit(1)
    click.echo(f"ok: {result.entries} entries verified{(' — ' + result.message) if result.message else ''}")
    if openings is not None:
        check_openings = getattr(cls, "verify_openings", None)
        if check_openings is None:
            raise FedcoreUserError(f"ledger '{name}' cannot check openings", where="--openings")
        opened, problem = check_openings(target, openings)
        if problem is not None:
            click.echo(f"TAMPERED: opening: {problem}", err=True)
            sys.exit(1)
        click.echo(f"ok: {opened} openings open their commitments")


def _ledger_name_of(target: Path) -> str | None:
    from fedcore.report.summary import run_spec

    found = run_spec(target)
    return None if found is None else (found[1].get("ledger") or {}).get("use")


def _deployment(name: str) -> Any:
    """A deployment entry point (group ``fedcore.deployment``; fedcore's own is ``fedcore.plugins.deploy``)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="fedcore.deployment"):
        if ep.name == name:
            return ep.load()
    raise FedcoreUserError("--federation needs fedcore's deployment support, which is not installed", hint="pip install 'fedcore[deploy]'")


def _add_extension_commands() -> None:
    """Command groups other packages register (group ``fedcore.cli``): fabric's ``fabric`` (the local network), the deployment's ``federation`` and ``site``."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="fedcore.cli"):
        try:
            cli.add_command(ep.load(), ep.name)
        except Exception:  # noqa: S112 - a broken extension must not take the core CLI down; 'fedcore plugins' lists failures
            continue


_add_extension_commands()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
