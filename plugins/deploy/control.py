"""The coordinator's use of the SuperLink's Control API: register sites, start the study, watch it.

Uses Flower's own client (``ControlHttpClient``) and FAB builder; nothing here
is a transport of its own.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fedcore.plugins.deploy.certs import FederationCerts
from fedcore.errors import RunFailure

FAB_NAME = "fedcore-study"


def fab_pyproject() -> bytes:
    """The FAB's ``pyproject.toml``: fedcore's ServerApp and ClientApp, from the installed fedcore."""
    from fedcore import __version__

    return f"""[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{FAB_NAME}"
version = "{__version__}"
description = "fedcore study (ServerApp and ClientApp from the installed fedcore)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedcore"

[tool.flwr.app.components]
serverapp = "fedcore.plugins.deploy.server:app"
clientapp = "fedcore.plugins.deploy.client:app"

[tool.flwr.app.config]
run-dir = ""
certs = ""
connect-timeout-s = 300.0
resume = false
""".encode()


def build_fab() -> bytes:
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": fab_pyproject(), "README.md": b"fedcore study\n"})[0]


def control_client(address: str, ca: Path | None) -> Any:
    """Flower's Control API client for the SuperLink at ``address`` (TLS with ``ca`` unless None)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(
        name="fedcore", address=address, root_certificates=str(Path(ca).resolve()) if ca else None, insecure=ca is None
    )
    return init_http_client_from_connection(connection)


def register_sites(client: Any, certs: FederationCerts) -> dict[str, int]:
    """Register every site's SuperNode key from ``sites.json`` (idempotent); node id by site name."""
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    registered = {bytes(n.public_key).strip(): n.node_id for n in client.ListNodes(ListNodesRequest()).nodes_info}
    out: dict[str, int] = {}
    for name, entry in sorted(certs.registry().items()):
        key = serialization.load_ssh_public_key(entry["node_public_key"].encode())
        pem = public_key_to_bytes(key)  # type: ignore[arg-type]
        existing = registered.get(pem.strip())
        if existing is not None:
            out[name] = existing
            continue
        out[name] = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name)).node_id
    return out


def start_study(client: Any, run_dir: Path, certs: Path, connect_timeout_s: float, resume: bool = False) -> int:
    """Submit fedcore's FAB as a new Flower run; its ServerApp writes ``run_dir``. Returns the Flower run id."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = build_fab()
    config = {"run-dir": str(run_dir.resolve()), "certs": str(certs.resolve()), "connect-timeout-s": float(connect_timeout_s), "resume": resume}
    response = client.StartRun(
        StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})), override_config=user_config_to_proto(config))
    )
    if not response.HasField("run_id"):
        raise RunFailure("the SuperLink did not start the study's run (see its log)")
    return int(response.run_id)


def run_status(client: Any, run_id: int) -> tuple[str, str, str]:
    """(status, sub_status, details) of a Flower run."""
    from flwr.proto.control_pb2 import ListRunsRequest

    run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
    return run.status.status, run.status.sub_status, run.status.details


def stop_run(client: Any, run_id: int) -> None:
    from flwr.proto.control_pb2 import StopRunRequest

    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    except Exception:  # already finished: nothing to stop
        pass


def wait_finished(client: Any, run_id: int, timeout_s: float, poll_s: float = 1.0) -> tuple[str, str]:
    """Wait (at most ``timeout_s``) for the Flower run to finish; (sub_status, details)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, sub, details = run_status(client, run_id)
        if status == "finished":
            return sub, details
        time.sleep(poll_s)
    stop_run(client, run_id)
    raise RunFailure(f"the study did not finish within {timeout_s:g}s; stopped it (raise --timeout for long studies)")
