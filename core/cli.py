"""The ``fedcore`` command line: run, validate, plugins, report, ledger verify.

Exit codes: 0 success, 1 internal error (or a ledger that fails verification),
2 user error (spec, data, plugin), always as one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click

from fedcore.errors import FedcoreUserError, RunFailure


class _Group(click.Group):
    """Turns every error into one line and the documented exit code."""

    def main(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except FedcoreUserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except RunFailure as exc:
            click.echo(f"run failed: {exc}", err=True)
            sys.exit(1)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # internal error: one line, details in a log file
            log = Path.cwd() / "fedcore-error.log"
            try:
                log.write_text(traceback.format_exc())
                where = f" (traceback in {log})"
            except OSError:
                where = ""
            click.echo(f"internal error: {type(exc).__name__}: {exc}{where}", err=True)
            sys.exit(1)


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
@click.argument("spec", type=click.Path(path_type=Path))
@_set_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="run directory (default runs/NAME-TIME)")
@click.option("--workers", type=int, default=None, help="parallel worker processes (default: spec, else CPU cores)")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def run(spec: Path, overrides: tuple[str, ...], out: Path | None, workers: int | None, no_progress: bool) -> None:
    """Run the experiment SPEC and write its report."""
    from fedcore.engine.runner import run_experiment
    from fedcore.spec import load_experiment

    experiment = load_experiment(spec, overrides)
    if out is not None and out.exists() and any(out.iterdir()):
        raise FedcoreUserError(f"output directory {out} is not empty", hint="choose a new --out directory")
    run_dir = run_experiment(experiment, out=out, workers=workers, progress=False if no_progress else None)
    click.echo(f"report: {run_dir / 'report.md'}")


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@_set_option
def validate(spec: Path, overrides: tuple[str, ...]) -> None:
    """Check SPEC (keys, types, plugins, settings, compatibility) without running it."""
    from fedcore.spec import load_experiment

    experiment = load_experiment(spec, overrides)
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
def ledger_verify(target: Path, keys: Path | None, head: str | None, ledger_name: str | None) -> None:
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
    if result.ok:
        click.echo(f"ok: {result.entries} entries verified{(' — ' + result.message) if result.message else ''}")
        return
    click.echo(f"TAMPERED: entry {result.first_bad_sequence}: {result.message}", err=True)
    sys.exit(1)


def _ledger_name_of(target: Path) -> str | None:
    from fedcore.report.summary import run_spec

    found = run_spec(target)
    return None if found is None else (found[1].get("ledger") or {}).get("use")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
