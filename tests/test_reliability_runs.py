"""Runs that fail, are interrupted or are killed: status, error log, report, observers, orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import TINY_SPEC, fedcore_script

from fedcore import hookimpl
from fedcore.plugins.aggregators.fedavg import FedAvg
from fedcore.rundir import atomic_write_text, call_observers, read_status, write_new_file
from fedcore.testing import run_spec_text


class BrokenAggregator(FedAvg):
    """A FedAvg that fails in round 2 of repeat 1 (a bug in a plugin: a real exception mid-run)."""

    name: ClassVar[str] = "broken-fedavg"

    def aggregate_sum(self, round, global_weights, summed):  # type: ignore[no-untyped-def]
        if round == 2 and BrokenAggregator.fail_repeat == BrokenAggregator.repeat_seen:
            raise RuntimeError("the aggregator broke")
        return super().aggregate_sum(round, global_weights, summed)

    fail_repeat: ClassVar[int] = 1
    repeat_seen: ClassVar[int] = 0


class BrokenPlugin:
    @hookimpl
    def fedcore_aggregators(self):  # type: ignore[no-untyped-def]
        return [BrokenAggregator]


class Watcher:
    """An observer with a bug in one hook; it records what it saw in the others."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def fedcore_round_end(self, record):  # type: ignore[no-untyped-def]
        BrokenAggregator.repeat_seen = record.repeat
        self.events.append(f"round:{record.repeat}:{record.round}")
        raise ValueError("observer bug")

    @hookimpl
    def fedcore_run_end(self, summary, run_dir):  # type: ignore[no-untyped-def]
        self.events.append("end")

    @hookimpl
    def fedcore_run_failed(self, run_dir, status):  # type: ignore[no-untyped-def]
        self.events.append(f"failed:{status['state']}:{status.get('job', {}).get('repeat')}")


def test_an_observers_exception_is_logged_by_name_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = Watcher()
    run_dir = run_spec_text(TINY_SPEC, tmp_path / "run", extra_plugins=[watcher])
    assert (run_dir / "report.md").is_file()
    assert read_status(run_dir)["state"] == "complete"
    assert watcher.events[-1] == "end" and watcher.events.count("round:0:2") == 1
    assert any("observer plugin" in r.message and "observer bug" in r.message for r in caplog.records)


def test_a_failed_run_says_which_repeat_and_seed_and_its_report_renders_what_exists(tmp_path: Path) -> None:
    watcher = Watcher()
    text = TINY_SPEC.replace("repeats: 1", "repeats: 2").replace("use: fedavg", "use: broken-fedavg")
    text = text.replace("execution: {progress: false}", "execution: {progress: false, engine: sequential}")
    with pytest.raises(RuntimeError, match="the aggregator broke") as info:
        run_spec_text(text, tmp_path / "run", extra_plugins=[BrokenPlugin(), watcher])
    run_dir = tmp_path / "run"
    assert info.value.fedcore_run_dir == run_dir  # type: ignore[attr-defined]
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["error_kind"] == "internal error"
    assert status["job"] == {"arm": "main", "repeat": 1, "seed": 4, "mode": "federated"}
    assert "RuntimeError: the aggregator broke" in status["error"]
    assert "Traceback" in (run_dir / status["log"]).read_text()
    assert watcher.events[-1] == "failed:failed:1" and "end" not in watcher.events
    from fedcore.report import build_report

    report = build_report(run_dir).read_text()
    assert "INCOMPLETE" in report and "repeat 1, seed 4" in report and "| main | federated | 0 | 2 |" in report


def test_cli_internal_error_goes_to_the_run_directory_never_through_a_symlink(tmp_path: Path, run_cli, monkeypatch) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "fedcore-error.log").symlink_to(victim)
    from fedcore import registry

    original = registry.PluginManager.__init__

    def with_broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["extra_plugins"] = [BrokenPlugin()]
        original(self, *args, **kwargs)

    monkeypatch.setattr(registry.PluginManager, "__init__", with_broken)
    BrokenAggregator.repeat_seen = 0
    BrokenAggregator.fail_repeat = 0
    try:
        spec = tmp_path / "s.yaml"
        spec.write_text(TINY_SPEC.replace("use: fedavg", "use: broken-fedavg").replace("{progress: false}", "{progress: false, engine: sequential}"))
        result = run_cli("run", str(spec), "--out", str(tmp_path / "run"))
    finally:
        BrokenAggregator.fail_repeat = 1
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "internal error: RuntimeError: the aggregator broke (arm 'main', repeat 0, seed 3, federated)" in result.stderr
    assert f"traceback in {tmp_path / 'run'}/error.log" in result.stderr
    assert victim.read_text() == "keep me"
    report = run_cli("report", str(tmp_path / "run"))
    assert report.returncode == 0 and "INCOMPLETE" in (tmp_path / "run" / "report.md").read_text()


def test_error_files_never_follow_symlinks_or_clobber(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "error.log").symlink_to(victim)
    first = write_new_file(tmp_path, "error.log", "a")
    assert first.name == "error-1.log" and victim.read_text() == "keep"
    assert write_new_file(tmp_path, "error.log", "b").name == "error-2.log"
    target = tmp_path / "status.json"
    target.symlink_to(victim)
    atomic_write_text(target, "{}")
    assert victim.read_text() == "keep" and not target.is_symlink() and target.read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_call_observers_skips_wrappers_and_keeps_order() -> None:
    from fedcore.registry import PluginManager

    seen: list[str] = []

    class A:
        @hookimpl
        def fedcore_run_end(self, summary):  # type: ignore[no-untyped-def]
            seen.append("a")

    class B:
        @hookimpl
        def fedcore_run_end(self, summary, run_dir):  # type: ignore[no-untyped-def]
            raise KeyError("b")

    manager = PluginManager(use_entry_points=False, extra_plugins=[A(), B()])
    assert call_observers(manager, "fedcore_run_end", summary={}, run_dir=Path(".")) == ["local-1"]
    assert seen == ["a"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _long_run_with_two_workers(tmp_path: Path, output: int) -> tuple[subprocess.Popen, Path]:
    """A `fedcore run --workers 2` in its own session, returned once two rounds are written."""
    spec = tmp_path / "long.yaml"
    spec.write_text(TINY_SPEC.replace("repeats: 1", "repeats: 4").replace("rounds: 2", "rounds: 40"))
    run_dir = tmp_path / "run"
    main = subprocess.Popen(
        [fedcore_script(), "run", str(spec), "--out", str(run_dir), "--workers", "2", "--no-progress"],
        stdout=output,
        stderr=output,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 480
    rounds = run_dir / "rounds.jsonl"
    while not (rounds.is_file() and rounds.read_text().count("\n") >= 2):
        if main.poll() is not None or time.monotonic() > deadline:
            main.kill()
            pytest.fail("the run ended, or wrote no round in 480 s, before it could be stopped")
        time.sleep(0.2)
    return main, run_dir


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_kill_9_of_the_main_process_leaves_no_worker_and_nothing_written_after(tmp_path: Path) -> None:
    main, run_dir = _long_run_with_two_workers(tmp_path, subprocess.DEVNULL)
    try:
        assert len(_session_pids(main.pid)) >= 3  # main, the queue's manager, the workers
        os.kill(main.pid, signal.SIGKILL)
        main.wait(timeout=10)
        time.sleep(0.3)
        at_kill = _snapshot(run_dir)
        time.sleep(5)
        assert _session_pids(main.pid) == []
        assert _snapshot(run_dir) == at_kill
        assert read_status(run_dir)["state"] == "running"  # nobody could say otherwise: the report says so
    finally:
        for pid in _session_pids(main.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_sigterm_interrupts_a_run_kills_its_workers_and_says_so(tmp_path: Path) -> None:
    main, run_dir = _long_run_with_two_workers(tmp_path, subprocess.PIPE)
    try:
        main.send_signal(signal.SIGTERM)
        _, stderr = main.communicate(timeout=60)
        assert main.returncode == 130
        assert stderr.count("\n") == 1 and stderr.startswith("interrupted") and "is interrupted" in stderr
        time.sleep(5)
        assert _session_pids(main.pid) == []
        assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    finally:
        for pid in _session_pids(main.pid):
            os.kill(pid, signal.SIGKILL)
