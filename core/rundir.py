"""The run directory's life: its ``status.json``, atomic writes, the error log, observer calls.

A run directory is in one of four states, written atomically (write a temporary
file, then rename it over the old one) to ``RUN/status.json``:

- ``running``: training is under way (or the process died without a word: a
  ``kill -9`` or a power cut leaves ``running`` with a dead ``pid``);
- ``complete``: ``summary.json`` and ``report.md`` are written;
- ``failed``: an error stopped it; ``status.json`` says which training (arm,
  repeat, seed) and why, the traceback is in ``RUN/error.log``;
- ``interrupted``: Ctrl-C or SIGTERM stopped it.

``fedcore report`` renders a run that is not complete from what it holds
(:func:`incomplete_report`), labelled incomplete.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import traceback
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedcore.errors import FedcoreUserError, RunFailure

STATUS_FILE = "status.json"
ERROR_LOG = "error.log"
STATES = ("running", "complete", "failed", "interrupted")

log = logging.getLogger("fedcore")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half of it.

    The bytes go to a fresh temporary file in the same directory, are flushed to the
    disk, and the temporary file is renamed over ``path`` (a rename is atomic on POSIX);
    the directory entry is then flushed too. A symlink at ``path`` is replaced, never followed.

    :param durable: False skips the two flushes to the disk (about 7 ms a file): the file is
        still whole or absent after a process crash, but a power cut may lose it, or leave
        it empty. For files whose reader checks them and falls back (checkpoint parts).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_new_file(directory: Path, name: str, text: str) -> Path:
    """Create a new file ``name`` in ``directory`` (``name-1``, ``name-2``... when taken).

    Never follows a symlink and never overwrites anything: the file is opened with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``.
    """
    stem, dot, suffix = name.partition(".")
    for index in range(1000):
        candidate = directory / (name if index == 0 else f"{stem}-{index}{dot}{suffix}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return candidate
    raise FileExistsError(f"no free name for {name} in {directory}")


def write_error_log(run_dir: Path | None, text: str) -> Path:
    """Save a traceback: in the run directory when there is one, else in a new temporary file."""
    if run_dir is not None and run_dir.is_dir() and not run_dir.is_symlink():
        try:
            return write_new_file(run_dir, ERROR_LOG, text)
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="fedcore-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(name)


def create(run_dir: Path) -> Path:
    """Make the run directory; one that cannot be made is the user's to fix (exit 2)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedcoreUserError(
            f"cannot create the run directory: {exc.strerror}",
            where=str(run_dir),
            hint="pass --out DIR in a writable place, or set execution.out_dir",
        ) from None
    return run_dir


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``status.json``, or None when there is none (or it is unreadable)."""
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(run_dir: Path, state: str, **details: Any) -> dict[str, Any]:
    """Atomically replace ``status.json`` with ``state`` and ``details`` (keeping ``started``)."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    previous = read_status(run_dir) or {}
    status = {
        "state": state,
        "started": previous.get("started", _now()),
        "updated": _now(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        **details,
    }
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(status, indent=1, default=str) + "\n")
    return status


# ------------------------------------------------------------------- failures


def tag_job(exc: BaseException, job: dict[str, Any]) -> None:
    """Remember on ``exc`` which training raised it (kept when it crosses from a worker process)."""
    if not hasattr(exc, "fedcore_job"):
        exc.fedcore_job = job  # type: ignore[attr-defined]


def failure_details(exc: BaseException) -> dict[str, Any]:
    """What ``status.json`` says about a failure: the error, its kind, and the training it hit."""
    interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
    kind = "user error" if isinstance(exc, FedcoreUserError) else "run failure" if isinstance(exc, RunFailure) else "internal error"
    details: dict[str, Any] = {
        "error": "interrupted" if interrupted else f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
        "error_kind": "interrupted" if interrupted else kind,
    }
    job = getattr(exc, "fedcore_job", None)
    if job:
        details["job"] = job
    return details


@contextmanager
def tracked(run_dir: Path, plugins: Any) -> Iterator[None]:
    """Mark ``run_dir`` running, then complete, failed or interrupted; failures call ``fedcore_run_failed``.

    The exception goes on to the caller, carrying ``fedcore_run_dir`` so the CLI
    writes its traceback into the run directory.
    """
    write_status(run_dir, "running")
    try:
        yield
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
        details = failure_details(exc)
        if not interrupted and not isinstance(exc, FedcoreUserError):
            details["log"] = write_error_log(run_dir, "".join(traceback.format_exception(exc))).name
        status = write_status(run_dir, "interrupted" if interrupted else "failed", **details)
        exc.fedcore_run_dir = run_dir  # type: ignore[attr-defined]
        exc.fedcore_logged = "log" in details  # type: ignore[attr-defined]
        call_observers(plugins, "fedcore_run_failed", run_dir=run_dir, status=status)
        raise
    write_status(run_dir, "complete")


def describe_job(job: dict[str, Any] | None) -> str:
    if not job:
        return ""
    return f" (arm '{job.get('arm')}', repeat {job.get('repeat')}, seed {job.get('seed')}, {job.get('mode')})"


# ------------------------------------------------------------------- observers


def call_observers(plugins: Any, hook_name: str, **kwargs: Any) -> list[str]:
    """Call every implementation of a lifecycle hook; one that raises is logged by name and skipped.

    Observers watch a run without changing it, so none of them can stop it.
    Returns the names of the plugins that failed.
    """
    caller = getattr(plugins.hook, hook_name)
    failed: list[str] = []
    for impl in reversed(caller.get_hookimpls()):  # pluggy's own order: last registered first
        if getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False):
            continue
        try:
            impl.function(*(kwargs[name] for name in impl.argnames))
        except Exception as exc:  # an observer's bug must not end the run
            failed.append(impl.plugin_name)
            log.warning(
                "observer plugin '%s' raised in %s and was skipped: %s: %s",
                impl.plugin_name, hook_name, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "",
            )
    return failed


# ------------------------------------------------------------------- incomplete report


def incomplete_report(run_dir: Path, status: dict[str, Any] | None) -> str:
    """Markdown for a run that did not complete: its state, its error, the rounds it finished."""
    from fedcore.types import RoundRecord

    state = (status or {}).get("state", "unknown (no status.json)")
    if state == "running":
        state = "running, or died without a word (its process is gone if the machine restarted)"
    out = [f"# fedcore report: {run_dir.name} (INCOMPLETE)", "", f"**This run is incomplete: {state}.**", ""]
    if status and status.get("error"):
        out.append(f"- error: {status['error']}{describe_job(status.get('job'))}")
    if status and status.get("log"):
        out.append(f"- traceback: `{status['log']}`")
    if status:
        out.append(f"- started {status.get('started')}, last update {status.get('updated')}")
    out += ["", "Only the rounds written to `rounds.jsonl` before it stopped are shown.", ""]
    rounds: dict[tuple[str, str, int], list[RoundRecord]] = defaultdict(list)
    path = run_dir / "rounds.jsonl"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = RoundRecord.model_validate_json(line)
        except ValueError:  # a line cut by the crash
            continue
        rounds[(record.arm, record.mode, record.repeat)].append(record)
    if not rounds:
        out.append("No round was completed.")
        return "\n".join(out) + "\n"
    out += ["| arm | mode | repeat | rounds done | last test accuracy | last test F1 |", "|---|---|---|---|---|---|"]
    for (arm, mode, repeat), records in sorted(rounds.items()):
        last = records[-1]
        out.append(
            f"| {arm} | {mode} | {repeat} | {len(records)} | {100 * last.test.accuracy:.1f}% | {last.test.f1:.3f} |"
        )
    return "\n".join(out) + "\n"
