"""``fedcore run SPEC --federation HOST:PORT --certs DIR``: the coordinator's command.

Validates the spec, creates the run directory, registers the sites' SuperNode
keys, submits fedcore's FAB to the SuperLink and waits (bounded) for the
ServerApp's ``status.json``. The numbers come from the same plugins and the
same :class:`~fedcore.engine.simulation.FederatedRun` as a simulation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import click

from fedcore.plugins.deploy import require_flwr
from fedcore.plugins.deploy.certs import FederationCerts
from fedcore.plugins.deploy.processes import check_superlink
from fedcore.errors import FedcoreUserError, PluginError, RunFailure, SpecError
from fedcore.spec import ExperimentSpec, load_experiment, resolved_yaml

INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Every update crosses the network in the clear "
    "and any process can join the federation. Use this only on a machine you alone control."
)


def check_deployable(spec: ExperimentSpec) -> None:
    """Refuse, at load, what a deployment cannot run (with the reason and the fix)."""
    if spec.secure_aggregation is not None and spec.secure_aggregation.use == "crypten":
        raise PluginError(
            "secure aggregator 'crypten' runs its parties on the simulation's machine; it is simulation-only",
            where="secure_aggregation.use",
            hint="use 'secagg-plus' (Flower's SecAgg+) in a deployment, or run without --federation",
        )
    if spec.data.use != "site-tables":
        raise SpecError(
            f"dataset '{spec.data.use}' would be read by the coordinator; in a deployment each site reads its own table",
            where="data.use",
            hint="use 'site-tables' with the preprocessing options; each site's site.yaml names its table and columns",
        )
    if spec.training.min_sites is not None and spec.training.min_sites < 1:
        raise SpecError("training.min_sites must be at least 1", where="training.min_sites")


def preprocessing_timeout(spec: ExperimentSpec) -> float:
    """How long preprocessing waits for every site (reading a table is slower than a round of a small model)."""
    return max(600.0, spec.training.round_timeout_s)


def default_timeout(spec: ExperimentSpec, connect_timeout_s: float) -> float:
    """An upper bound of a study's wall time from its own timeouts (every wait is bounded)."""
    t = spec.training
    per_round = t.round_timeout_s * (t.round_retries + 1) + t.round_timeout_s
    return connect_timeout_s + spec.repeats * (2 * preprocessing_timeout(spec) + t.rounds * per_round) + 120.0


def run_study(
    spec_path: Path,
    overrides: Sequence[str],
    address: str,
    certs_dir: Path,
    out: Path | None,
    insecure: bool = False,
    connect_timeout_s: float = 300.0,
    timeout_s: float | None = None,
    resume: Path | None = None,
) -> Path:
    """Run the study SPEC on the federation at ``address``; returns the run directory.

    With ``resume`` (a run directory whose coordinator stopped), a new Flower run
    continues that study after its last completed round, with the run
    directory's own resolved spec.
    """
    require_flwr()
    from fedcore.plugins.deploy.control import control_client, register_sites, start_study, wait_finished
    from fedcore.engine.runner import timestamped_run_dir

    if resume is not None:
        resume = Path(resume).resolve()
        if not (resume / "deployment.json").is_file() or not (resume / "spec.resolved.yaml").is_file():
            raise FedcoreUserError(
                f"{resume} is not a deployed run's directory", hint="give --resume the run directory of a 'fedcore run --federation'"
            )
        spec_path, overrides = resume / "spec.resolved.yaml", ()
    experiment = load_experiment(spec_path, overrides)
    spec = experiment.spec
    check_deployable(spec)
    certs = FederationCerts(Path(certs_dir))
    registry = certs.registry()
    if spec.training.min_sites is not None and spec.training.min_sites > len(registry):
        raise SpecError(
            f"training.min_sites is {spec.training.min_sites} but the federation has {len(registry)} sites",
            where="training.min_sites",
            hint=f"at most {len(registry)}",
        )
    if insecure:
        click.secho(INSECURE_WARNING, err=True, fg="red", bold=True)
    ca = None if insecure else certs.ca
    check_superlink(address, ca, "coordinator")
    if resume is not None:
        run_dir = resume
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        if status.get("state") == "complete":
            raise FedcoreUserError(f"the study in {run_dir} is complete; nothing to resume")
        study = json.loads((run_dir / "deployment.json").read_text())["study"]
        (run_dir / "status.json").unlink(missing_ok=True)
    else:
        run_dir = timestamped_run_dir(spec, out).resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FedcoreUserError(f"output directory {run_dir} is not empty", hint="choose a new --out directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.resolved.yaml").write_text(resolved_yaml(spec))
        study = uuid.uuid4().hex[:16]
        (run_dir / "deployment.json").write_text(
            json.dumps({"study": study, "federation": address, "sites": sorted(registry), "tls": not insecure}, indent=1)
        )
    client = control_client(address, ca)
    register_sites(client, certs)
    flower_run = start_study(client, run_dir, certs.root, connect_timeout_s, resume=resume is not None)
    click.echo(f"study {study}: Flower run {flower_run} on {address}; run directory {run_dir}", err=True)
    budget = timeout_s if timeout_s is not None else default_timeout(spec, connect_timeout_s)
    try:
        sub, details = wait_finished(client, flower_run, budget)
    except RunFailure:
        raise
    except Exception as exc:  # the SuperLink went away while we waited
        raise RunFailure(
            f"lost the SuperLink at {address} while the study ran ({type(exc).__name__}); when it is back, continue with "
            f"'fedcore run {spec_path} --federation {address} --certs {certs.root} --resume {run_dir}'"
        ) from None
    status_path = run_dir / "status.json"
    deadline = time.monotonic() + 10
    while not status_path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    status = json.loads(status_path.read_text()) if status_path.exists() else {"state": "failed", "error": details or sub}
    if status.get("state") != "complete":
        error = str(status.get("error") or f"the study's ServerApp ended ({sub}) without a result: {details}")
        if status.get("exit_code") == 2:
            raise FedcoreUserError(error)
        raise RunFailure(error)
    return run_dir
