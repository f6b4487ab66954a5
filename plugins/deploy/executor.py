"""A hospital's warm executor: each ClientApp process is forked from one that has imported it already.

In its default ``subprocess`` isolation a SuperNode starts Flower's SuperExec,
which starts a fresh ``flwr-clientapp`` process for every message: Python,
Flower, then fedcore's ClientApp (torch, Opacus, fedcore) are imported again
each time, about 12 s of a message on this 2-core machine with three sites at
once. fedcore runs the SuperNode with ``--isolation process`` and this
executor beside it (:func:`fedcore.plugins.deploy.processes.supernode_with_executor`):

- it imports Flower and fedcore's ClientApp once, at start;
- it runs Flower's own SuperExec loop (:func:`flwr.supercore.superexec.run_superexec.run_superexec`:
  it acquires each task from the SuperNode's Runtime API on loopback, signed with
  the SuperNode's SuperExec secret) with :class:`ForkExecutor` as its executor;
- :class:`ForkExecutor` forks a child per task, which runs Flower's own
  ``run_clientapp`` with the task's token: the same code ``flwr-clientapp`` runs,
  and still one process per message (a crash, memory and the site's state on disk
  behave as before), without the imports.

The executor exits when its SuperNode does (Flower's parent-process monitor),
and each child when the executor does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Flower is imported by the executor's process itself (main), not by whoever builds its command
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

#: The Flower module whose executor factory this module replaces (pinned flwr; checked at start).
SUPEREXEC_MODULE = "flwr.supercore.superexec.run_superexec"


class ForkExecutor:
    """Flower's SuperExec ``Executor`` protocol, launching a task as a fork of this (warm) process."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(
        self, supported_task_types: set[object], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[object], set[str]]:
        """Every task type the plugin supports can start now (one message at a time reaches a SuperNode)."""
        return set(supported_task_types), set()

    def wait_for_capacity(self, task_type: object = None, *, fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        """No capacity gate: return at once."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a child that runs Flower's ``run_clientapp`` for ``spec``'s token; the parent returns at once."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"fedcore's site executor runs ClientApps only, not '{spec.task_type}'")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _run_task(spec)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap children that have finished (no zombies between tasks)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Nothing to release: a running child stops by itself when this process is gone."""


def _run_task(spec: ExecutionSpec) -> None:
    """In the forked child: run the task's ClientApp with Flower's own code, then leave with its exit code."""
    code = 1
    try:
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        from fedcore.plugins.deploy import client

        client.forked()
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exc:  # run_clientapp ends with flwr_exit (sys.exit)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def executor_command(runtime_api_address: str, secret_file: Path, supernode_pid: int) -> list[str]:
    """The command that runs this executor for the SuperNode whose Runtime API is at ``runtime_api_address``."""
    return [
        sys.executable, "-m", "fedcore.plugins.deploy.executor", "--runtime-api-address", runtime_api_address,
        "--superexec-auth-secret-file", str(secret_file), "--supernode-pid", str(supernode_pid),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedcore's warm ClientApp executor for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (loopback)")
    parser.add_argument("--superexec-auth-secret-file", type=Path, required=True, help="the SuperNode's SuperExec secret")
    parser.add_argument("--supernode-pid", type=int, required=True, help="exit when this process is gone")
    args = parser.parse_args(argv)
    started = time.monotonic()
    import importlib

    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    import fedcore.plugins.deploy.client  # noqa: F401 - the warm part: torch, Opacus, fedcore, Flower, once

    superexec = importlib.import_module(SUPEREXEC_MODULE)
    if not callable(getattr(superexec, "get_executor", None)) or not callable(getattr(superexec, "run_superexec", None)):
        raise SystemExit(f"fedcore's site executor: this flwr has no {SUPEREXEC_MODULE}.get_executor; install the flwr fedcore pins")
    print(f"fedcore site executor: ClientApp imported in {time.monotonic() - started:.1f}s; serving {args.runtime_api_address}", flush=True)
    superexec.get_executor = lambda *_, **__: ForkExecutor()  # Flower's loop, fedcore's executor (flwr is pinned)
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on loopback only, as with Flower's own SuperExec
        superexec_auth_secret=load_superexec_auth_secret(str(args.superexec_auth_secret_file)),
        parent_pid=args.supernode_pid,
    )


if __name__ == "__main__":
    main()
