"""fedcore's adjustments of Flower's Fleet transport (:mod:`fedcore.plugins.deploy.transport`).

The adjustments patch Flower's classes in the process they run in, so each check
runs in a fresh Python process, as the SuperLink and SuperNodes do; one starts
Flower's real SuperLink and talks HTTP to it on loopback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the deploy extra (flwr) is not installed")

from fedcore.plugins.deploy import transport  # noqa: E402
from fedcore.plugins.deploy.certs import make_certs  # noqa: E402
from fedcore.plugins.deploy.local import start_superlink  # noqa: E402
from fedcore.plugins.deploy.processes import free_port, superlink_command, supernode_command  # noqa: E402


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fedcore_starts_the_superlink_and_supernodes_through_the_adjusted_launcher(tmp_path: Path) -> None:
    link = superlink_command(tmp_path, tmp_path / "db", "127.0.0.1", 9092)
    node = supernode_command(tmp_path, "127.0.0.1:9092", tmp_path / "site.yaml", "hospital-0", 9094)
    assert link[:4] == [sys.executable, "-m", "fedcore.plugins.deploy.transport", "flower-superlink"]
    assert node[:4] == [sys.executable, "-m", "fedcore.plugins.deploy.transport", "flower-supernode"]
    # security is Flower's, unchanged: TLS and SuperNode authentication
    assert "--enable-supernode-auth" in link and "--auth-supernode-private-key" in node
    with pytest.raises(ValueError):
        transport.command("flwr-clientapp")


def test_the_pinned_flwr_is_the_one_the_adjustments_are_written_for() -> None:
    from importlib.metadata import version

    assert version("flwr") == transport.FLWR_VERSION


def test_a_supernode_keeps_one_connection_open_and_still_signs_every_request() -> None:
    result = _python(
        """
import json, httpx
from fedcore.plugins.deploy import transport
transport.tune_supernode()
from flwr.supercore import constant
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import generate_key_pairs
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from flwr.proto.fleet_pb2 import PullMessagesRequest
seen = {}
def answer(request):
    seen.update({k.decode().lower(): v.decode() for k, v in request.headers.raw})
    return httpx.Response(200, content=b"")
private, public = generate_key_pairs()
client = FleetHttpClient("https://127.0.0.1:9", verify=False,
                         interceptors=[RuntimeVersionHttpInterceptor("SuperNode"), NodeAuthHttpInterceptor(private, public)])
pool = client._client._transport._pool
expiry, most = pool._keepalive_expiry, pool._max_connections
client._client._transport = httpx.MockTransport(answer)
client.PullMessages(PullMessagesRequest())
print(json.dumps({"headers": sorted(seen), "expiry": expiry, "connections": most, "pulls": constant.FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS,
                  "pushes": constant.FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES}))
"""
    )
    assert result["expiry"] == transport.KEEPALIVE_S > 5 and result["connections"] == 1
    assert result["pulls"] == result["pushes"] == 1
    headers = set(result["headers"])
    assert not headers & set(transport.DROPPED_REQUEST_HEADERS)
    # Flower's node authentication and version headers are all still there
    assert {"flwr-public-key", "flwr-timestamp", "flwr-signature", "flwr-package-version", "content-type", "host"} <= headers


def test_another_flwr_runs_unchanged_with_a_warning(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[str] = []

    def tune() -> None:
        ran.append("tuned")

    monkeypatch.setattr(transport, "version", lambda _: "9.9.9")
    monkeypatch.setitem(transport.PROGRAMS, "flower-supernode", ("os", "getpid", tune))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    transport.main(["flower-supernode", "--insecure"])
    assert ran == [] and sys.argv == ["flower-supernode", "--insecure"]
    assert "9.9.9 is not 1.42.0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="usage"):
        transport.main(["flwr"])


def _response_head(sock: socket.socket) -> str:
    """One request on ``sock``; the response's status line and headers, lower case ("" when the server closed it)."""
    sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/protobuf\r\n"
                 b"Content-Length: 0\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return ""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    text = head.decode("latin-1").lower()
    length = int(next((line.split(":", 1)[1] for line in text.split("\r\n") if line.startswith("content-length:")), "0"))
    while len(body) < length:  # the body too, so that the next response starts clean
        body += sock.recv(65536)
    return text


def test_the_real_superlink_keeps_an_idle_connection_and_sends_no_date_or_server_header(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["hospital-0"])
    port = free_port()
    link = start_superlink(certs, tmp_path / "fed", "127.0.0.1", port, insecure=True)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = _response_head(sock)
            assert head.startswith("http/1.1 ") and "\r\ndate:" not in head and "\r\nserver:" not in head
            time.sleep(7)  # past uvicorn's default 5 s keep-alive, which would have closed the connection
            assert _response_head(sock).startswith("http/1.1 ")
    finally:
        link.stop()


#: Flower's own SuperNode receiving one message (its real ``_pull_and_store_message``, node state and object
#: store) from a fake Fleet API that refuses ``{refused}`` because the message's run stopped meanwhile, as the
#: SuperLink does (HTTP 403, ``RunNotRunningException``). The fake stands in for the SuperLink only.
_RECEIVE_FROM_A_STOPPED_RUN = """
import json
import numpy as np
from fedcore.plugins.deploy import transport
if {adjusted}:
    transport.tune_supernode()
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import Status
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate import NodeStateFactory

factory = NodeStateFactory(ObjectStoreFactory())
state, store = factory.state(), factory.objectstore_factory.store()
state.set_node_id(7)
state.store_run(Run.create_empty(42))  # a run the node knows: its earlier messages were received
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0  # as in the coordinator that sent it
message = Message(RecordDict({{"global": ArrayRecord([np.ones(3)])}}), dst_node_id=7, message_type="train.fedcore")
message.metadata.__dict__["_message_id"] = message.object_id
contents = {{k: v.deflate() for k, v in get_all_nested_objects(message).items()}}

def stopped(*_):
    raise RunNotRunningException

calls = {{"pull_object": lambda run_id, object_id: contents[object_id], "confirm_message_received": lambda run_id, object_id: None}}
calls["{refused}"] = stopped
pulled = start_client_internal._pull_and_store_message(
    state=state, object_store=store, node_config={{}}, receive=lambda: (message, get_object_tree(message)),
    get_run=None, get_fab=None, trusted_entities=None, **calls,
)
tasks = state.get_tasks()
print(json.dumps({{"pulled": pulled, "statuses": [[t.status.status, t.status.sub_status] for t in tasks],
                  "stored": len(state.get_messages_legacy(is_reply=False))}}))
"""


@pytest.mark.parametrize("refused", ["pull_object", "confirm_message_received"])
def test_a_supernode_drops_a_message_whose_run_stopped_while_it_was_received(refused: str) -> None:
    from flwr.common.constant import Status, SubStatus

    flower = _python(_RECEIVE_FROM_A_STOPPED_RUN.format(adjusted=False, refused=refused))
    # Flower 1.42 as it is: the message stays, and its task waits for an executor to run it; its reply would
    # take the push turn of the next message (a resumed coordinator waited for ever for that site's hello).
    assert flower["pulled"] is None and flower["stored"] == 1 and flower["statuses"] == [[Status.PENDING, ""]]
    adjusted = _python(_RECEIVE_FROM_A_STOPPED_RUN.format(adjusted=True, refused=refused))
    # Through fedcore's launcher: Flower's own clean-up, as for any message that could not be received.
    assert adjusted["pulled"] is None and adjusted["stored"] == 0
    assert adjusted["statuses"] == [[Status.FINISHED, SubStatus.FAILED]]
