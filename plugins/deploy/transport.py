"""Flower's SuperLink and SuperNode, started with fewer bytes per request on a site's link.

flwr 1.42's Fleet API is protobuf over HTTP/1.1: httpx at the SuperNode, uvicorn
at the SuperLink, every request over TLS with the node's public key, a timestamp
and a signature in its headers. Measured on a paper round (docs/deployment.md,
"Cost"), about a fifth of a site's bytes were HTTP headers and TLS:

- httpx closes a connection idle for 5 s, and so does uvicorn; a site trains for
  longer than that, so every heartbeat during training and the reply after it
  opened a new TCP connection with a full TLS handshake (about 2 KB each);
- Flower pulls and pushes a message's objects two at a time, and sends its
  heartbeats from a thread of their own: either opened a second connection (and
  handshake) beside the first when two requests met;
- every request carried httpx's ``Accept-Encoding``, ``Connection`` and
  ``User-Agent`` headers, every response uvicorn's ``Date`` and ``Server``
  headers (about 140 bytes a request; nothing reads them).

fedcore runs ``flower-superlink`` and ``flower-supernode`` through :func:`main`,
which changes exactly that, for the pinned flwr (:data:`FLWR_VERSION`; any other
version runs unchanged, with a warning): connections stay open while idle for
:data:`KEEPALIVE_S` s at the SuperNode and :data:`SERVER_KEEPALIVE_S` s at the
SuperLink (longer than the SuperNode's, so the site closes first and never sends on
a connection the SuperLink is closing; Flower's heartbeats, every 17-23 s, keep it
in use); a SuperNode has one connection, which its requests take in turn (they are
short; a heartbeat waits for the request in flight), and pulls or pushes a message's
objects one at a time (Flower's own ``FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS`` and
``..._PUSHES``); the five headers are left out. Everything else is Flower's:
TLS with the federation's CA, SuperNode authentication on every request, retries,
heartbeats, the messages. A connection the SuperLink dropped while idle is noticed
by httpx before reuse (or fails the request, which Flower retries), as before.

One fix rides along at the SuperNode (:func:`drop_messages_of_stopped_runs`): a message
whose run stops while the node receives it is dropped with its task, as Flower drops
any other message it could not receive, instead of being run and answered in the
place of the next message.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

#: The flwr these adjustments are written against (the ``deploy`` extra pins it); other versions run unchanged.
FLWR_VERSION = "1.42.0"
#: Seconds a SuperNode keeps an idle connection to the SuperLink (httpx's default: 5).
KEEPALIVE_S = 60.0
#: Seconds the SuperLink keeps an idle connection open (uvicorn's default: 5); above :data:`KEEPALIVE_S`.
SERVER_KEEPALIVE_S = 75
#: Default request headers of httpx that the SuperLink never reads (keep-alive is HTTP/1.1's default;
#: the SuperLink sends no compressed responses).
DROPPED_REQUEST_HEADERS = ("accept-encoding", "connection", "user-agent")
#: Flower's own settings: how many of a message's objects a SuperNode pulls or pushes at once (default 2).
SEQUENTIAL_OBJECTS = {"FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "1", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "1"}


def command(program: str) -> list[str]:
    """The command that starts Flower's ``program`` (``flower-superlink`` or ``flower-supernode``) through :func:`main`."""
    if program not in PROGRAMS:
        raise ValueError(f"no Flower program {program!r}")
    return [sys.executable, "-m", "fedcore.plugins.deploy.transport", program]


def tune_supernode() -> None:
    """In a SuperNode's process, before Flower is imported: one connection, kept open, without unread headers
    (and :func:`drop_messages_of_stopped_runs`)."""
    for name, value in SEQUENTIAL_OBJECTS.items():
        os.environ.setdefault(name, value)  # read by flwr.supercore.constant when it is imported
    import httpx
    from flwr.supercore.protobuf.client import ProtobufClient

    flower_init = ProtobufClient.__init__

    def __init__(self: ProtobufClient, base_url: str, **kwargs: Any) -> None:
        flower_init(self, base_url, **kwargs)
        # Flower's client, as Flower builds it, with a longer keep-alive and without the unread headers.
        self._client.close()
        self._client = httpx.Client(
            verify=kwargs.get("verify", True),
            timeout=kwargs.get("timeout", 30.0),
            follow_redirects=True,
            limits=httpx.Limits(max_connections=1, keepalive_expiry=KEEPALIVE_S),
        )
        for header in DROPPED_REQUEST_HEADERS:
            del self._client.headers[header]

    ProtobufClient.__init__ = __init__  # type: ignore[method-assign]
    drop_messages_of_stopped_runs()


class RunStoppedWhileReceiving(Exception):
    """The run of a message a SuperNode was receiving stopped meanwhile (see :func:`drop_messages_of_stopped_runs`)."""


def drop_messages_of_stopped_runs() -> None:
    """In a SuperNode's process: a message whose run stops while the node receives it is dropped, with its task.

    flwr 1.42's SuperNode creates a received message's task and stores the message, then pulls its
    objects and confirms receipt. When the SuperLink refuses either because the run stopped meanwhile
    (HTTP 403, raised as ``RunNotRunningException``, a ``BaseException``), Flower skips its own clean-up,
    which catches ``Exception`` only: the task still runs, and its reply takes the push turn of the next
    message (a node pushes after each pull), whose reply then waits at the node until another message
    comes. A coordinator's run stops that way when it is resumed after a crash (its stale ServerApp, or
    the SuperLink's heartbeat check, finishes the old run while the sites fetch its last messages), and
    the resumed coordinator waited for a site's answer it would never get. Raised as an ``Exception``,
    Flower's own clean-up runs: the message and its objects are deleted and its task is finished as
    failed (its token revoked), as for any other message that could not be received.
    """
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode import start_client_internal as node

    flower_pull = node._pull_and_store_message

    def as_error(call: Callable[..., Any]) -> Callable[..., Any]:
        def checked(run_id: int, *args: Any) -> Any:
            try:
                return call(run_id, *args)
            except RunNotRunningException:
                raise RunStoppedWhileReceiving(f"run {run_id} stopped while this node received the message") from None

        return checked

    def _pull_and_store_message(**kwargs: Any) -> int | None:
        for name in ("pull_object", "confirm_message_received"):
            kwargs[name] = as_error(kwargs[name])
        return flower_pull(**kwargs)

    node._pull_and_store_message = _pull_and_store_message


def tune_superlink() -> None:
    """In the SuperLink's process: its HTTP server keeps idle connections open and sends no ``Date``/``Server`` headers."""
    import uvicorn

    flower_run = uvicorn.run

    def run(*args: Any, **kwargs: Any) -> None:
        kwargs.update(timeout_keep_alive=SERVER_KEEPALIVE_S, server_header=False, date_header=False)
        flower_run(*args, **kwargs)

    uvicorn.run = run


#: Flower's console scripts that :func:`main` starts: (module, function, the adjustment made first).
PROGRAMS: dict[str, tuple[str, str, Callable[[], None]]] = {
    "flower-superlink": ("flwr.superlink.cli", "flower_superlink", tune_superlink),
    "flower-supernode": ("flwr.supernode.cli", "flower_supernode", tune_supernode),
}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedcore.plugins.deploy.transport flower-supernode ARGS...``: Flower's program with ARGS, adjusted."""
    program, *args = list(sys.argv[1:] if argv is None else argv) or [""]
    if program not in PROGRAMS:
        raise SystemExit(f"usage: python -m fedcore.plugins.deploy.transport {{{','.join(PROGRAMS)}}} ARGS...")
    module, function, tune = PROGRAMS[program]
    installed = version("flwr")
    if installed == FLWR_VERSION:
        tune()
    else:
        print(f"fedcore: flwr {installed} is not {FLWR_VERSION}: {program} runs with Flower's own connection settings "
              "(more bytes per request; install the fedcore pins)", file=sys.stderr, flush=True)
    sys.argv = [program, *args]
    getattr(importlib.import_module(module), function)()


if __name__ == "__main__":
    main()
