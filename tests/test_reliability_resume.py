"""``fedcore run --resume``: a run killed after a round chosen by the test's seed continues to the same numbers.

Real runs of small specs: an uninterrupted run, and the same spec in a subprocess that an
observer kills (``os._exit``, no clean-up, like a power cut) right after the round the
test's own seed picks; then ``fedcore run --resume``. In the reproducible mode (DP noise,
sampling and ledger salts from the seed) the resumed run's rounds, final weights,
epsilon and ledger payload digests equal the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcore.checkpoint import CheckpointLayout, training_key
from fedcore.rundir import read_status, write_status
from fedcore.testing import run_spec_text

SPEC = """\
name: resume
seed: 5
repeats: 2
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 160}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 3, local_epochs: 1, batch_size: 32}
aggregator: {use: AGGREGATOR}
ledger: {use: sqlite-chain}
privacy: [{use: gaussian, settings: {level: record, epsilon: 4.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: rdp}}]
baseline: {centralized: true}
execution: {progress: false, reproducible_noise: true, engine: ENGINE}
"""

#: a run that dies, without a word, right after the given federated (repeat, round) is recorded
KILLER = """\
import os, sys
from pathlib import Path
from fedcore import hookimpl
from fedcore.testing import run_spec_text

repeat, round_ = int(sys.argv[3]), int(sys.argv[4])

class Killer:
    @hookimpl
    def fedcore_round_end(self, record):
        if record.mode == "federated" and (record.repeat, record.round) == (repeat, round_):
            os._exit(9)

run_spec_text(Path(sys.argv[1]).read_text(), Path(sys.argv[2]), extra_plugins=[Killer()])
sys.exit(3)  # the run was meant to die before its end
"""

# The sequential engine with SCAFFOLD (site control variates, server state); the vectorized one with server momentum.
ENGINES = {"sequential": "scaffold", "vectorized": "fedavgm"}


def _spec(engine: str) -> str:
    return SPEC.replace("ENGINE", engine).replace("AGGREGATOR", ENGINES[engine])


def _killed_run(tmp_path: Path, text: str, repeat: int, round_: int) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run_dir = tmp_path / "killed"
    done = subprocess.run(
        [sys.executable, str(script), str(spec), str(run_dir), str(repeat), str(round_)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 9, done.stderr[-2000:]
    assert read_status(run_dir)["state"] == "running"  # nobody said anything: a dead process
    return run_dir


def _rounds(run_dir: Path) -> dict[tuple[str, str, int, int], dict]:
    """Every round's numbers (timings left out: they are measured, not computed)."""
    out = {}
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = (r["arm"], r["mode"], r["repeat"], r["round"])
        assert key not in out, f"round {key} written twice"
        out[key] = {k: r[k] for k in ("test", "validation", "per_site", "train_loss", "update_bytes", "privacy")}
    return out


def _ledger(run_dir: Path, name: str, kinds: tuple[str, ...] = ("site-update", "aggregate", "privacy-spent")) -> list[tuple]:
    with sqlite3.connect(run_dir / "ledger" / name / "ledger.sqlite") as conn:
        marks = ",".join("?" * len(kinds))
        return list(conn.execute(f"SELECT kind, round, writer, payload_sha256 FROM entries WHERE kind IN ({marks}) ORDER BY seq", kinds))


def _epsilons(run_dir: Path) -> list[float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return [p["epsilon"] for arm in summary["arms"] for run in arm["federated"]["runs"] for p in run["privacy"]]


def _verify(run_cli, run_dir: Path) -> None:
    for folder in (run_dir, *sorted((run_dir / "sites").iterdir())):
        result = run_cli("ledger", "verify", str(run_dir), "--openings", str(folder))
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_run_killed_after_a_seeded_round_resumes_to_the_uninterrupted_numbers(engine: str, tmp_path: Path, run_cli) -> None:
    text = _spec(engine)
    rng = random.Random(f"resume-{engine}")
    repeat, round_ = rng.randrange(2), rng.randrange(1, 3)  # after round 1 or 2 of 3, in either repeat
    whole = run_spec_text(text, tmp_path / "whole")
    killed = _killed_run(tmp_path, text, repeat, round_)
    assert len(_rounds(killed)) < len(_rounds(whole))

    result = run_cli("run", "--resume", str(killed), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert read_status(killed)["state"] == "complete"
    assert (killed / "report.md").is_file()

    assert _rounds(killed) == _rounds(whole)
    for final in sorted((whole / "checkpoints").glob("*.npz")):
        a, b = np.load(final), np.load(killed / "checkpoints" / final.name)
        assert a.files == b.files and all(np.array_equal(a[n], b[n]) for n in a.files), final.name
    assert _epsilons(killed) == _epsilons(whole) and all(e > 0 for e in _epsilons(whole))
    for repeat_index in range(2):
        name = f"main-r{repeat_index}"
        # Salts come from the seed in this mode, so the commitments themselves are equal, in order.
        assert _ledger(killed, name) == _ledger(whole, name)
        # One opening, no gap: the resumed chain holds one spec entry and, where it resumed, one 'resume' entry.
        assert len(_ledger(killed, name, ("spec",))) == len(_ledger(whole, name, ("spec",)))
        resumed = _ledger(killed, name, ("resume",))
        assert len(resumed) == (1 if engine == "vectorized" or repeat_index == repeat else 0)
    _verify(run_cli, killed)
    # A finished training's parts are pruned to its last round.
    layout = CheckpointLayout(killed, training_key("federated", "main", repeat))
    assert [p.name for p in layout.coordinator_dir.glob("round-*.pt")] == ["round-000003.pt"]


def test_a_round_the_coordinator_lost_is_replayed_by_the_sites_not_spent_twice(tmp_path: Path, run_cli) -> None:
    """The sites wrote their parts of round 2 and released it; the coordinator died before its part of round 2.

    The budget (epsilon 4) is calibrated for exactly 3 rounds: had the sites trained
    round 2 again, their accountants would count it twice and refuse round 3. They
    resend what they released, so the run ends as the uninterrupted one.
    """
    text = _spec("sequential").replace("repeats: 2", "repeats: 1").replace("baseline: {centralized: true}\n", "")
    whole = run_spec_text(text, tmp_path / "whole")
    killed = _killed_run(tmp_path, text, 0, 2)
    layout = CheckpointLayout(killed, training_key("federated", "main", 0))
    (layout.coordinator_dir / layout.file(2)).unlink()  # the crash came before the coordinator's part of round 2

    assert run_cli("run", "--resume", str(killed), "--no-progress").returncode == 0
    assert _rounds(killed) == _rounds(whole)
    assert _epsilons(killed) == _epsilons(whole)
    (run,) = json.loads((killed / "summary.json").read_text())["arms"][0]["federated"]["runs"]
    assert run["stopped_reason"] is None and run["privacy"][0]["steps"] == 3 * 4
    # Round 2's entries from before the crash stay on the chain, then the 'resume' entry (after round 1),
    # then round 2 again: the same commitments, since the sites sent the same updates.
    entries = _ledger(killed, "main-r0", ("site-update", "aggregate", "privacy-spent", "resume"))
    cut = next(i for i, e in enumerate(entries) if e[0] == "resume")
    assert entries[cut][1] == 1
    before, after = entries[:cut], entries[cut + 1 :]
    assert [e for e in before if e[1] == 2] == [e for e in after if e[1] == 2] != []
    assert [e for e in before if e[1] != 2] + after == _ledger(whole, "main-r0")
    _verify(run_cli, killed)


def test_a_release_resume_cannot_replay_stays_charged(tmp_path: Path, run_cli) -> None:
    """The coordinator's parts of rounds 2 and 3 are lost (a damaged disk): the run resumes after round 1,
    and each site's newest part (round 3) is not the next round's. Its accountant is kept: rounds 2 and 3
    stay charged, and redoing them is charged again, so the budget for 4 rounds stops the run early."""
    text = _spec("sequential").replace("repeats: 2", "repeats: 1").replace("baseline: {centralized: true}\n", "")
    text = text.replace("rounds: 3", "rounds: 4")
    whole = run_spec_text(text, tmp_path / "whole")
    killed = _killed_run(tmp_path, text, 0, 3)
    layout = CheckpointLayout(killed, training_key("federated", "main", 0))
    for round_ in (2, 3):
        (layout.coordinator_dir / layout.file(round_)).write_bytes(b"damaged")

    assert run_cli("run", "--resume", str(killed), "--no-progress").returncode == 0
    (run,) = json.loads((killed / "summary.json").read_text())["arms"][0]["federated"]["runs"]
    (whole_run,) = json.loads((whole / "summary.json").read_text())["arms"][0]["federated"]["runs"]
    assert "above the budget 4" in run["stopped_reason"] and whole_run["stopped_reason"] is None
    assert run["privacy"][0]["steps"] >= whole_run["privacy"][0]["steps"]  # never fewer than what was released
    assert run["privacy"][0]["epsilon"] >= whole_run["privacy"][0]["epsilon"] - 1e-12
    assert sorted(_rounds(killed)) == sorted(_rounds(whole))[: run["rounds"]]


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path, run_cli) -> None:
    text = _spec("sequential").replace("repeats: 2", "repeats: 1").replace("rounds: 3", "rounds: 2")
    complete = run_spec_text(text, tmp_path / "complete")

    def refused(*args: str) -> str:
        result = run_cli("run", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        return result.stderr

    assert "is complete; nothing to resume" in refused("--resume", str(complete))
    (tmp_path / "empty").mkdir()
    assert "not a fedcore run directory" in refused("--resume", str(tmp_path / "empty"))
    assert "not a fedcore run directory" in refused("--resume", str(tmp_path / "missing"))
    assert "without SPEC" in refused(str(tmp_path / "spec.yaml"), "--resume", str(complete))

    killed = _killed_run(tmp_path, text, 0, 1)
    # Still running: a live process holds it.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = read_status(killed)
        write_status(killed, "running", pid=sleeper.pid)
        assert f"still running (pid {sleeper.pid})" in refused("--resume", str(killed))
    finally:
        sleeper.kill()
        sleeper.wait()
    write_status(killed, status["state"])
    # The spec was edited after the crash: the parts are another spec's.
    resolved = killed / "spec.resolved.yaml"
    original = resolved.read_text()
    resolved.write_text(original.replace("learning_rate: 0.001", "learning_rate: 0.002"))
    assert original != resolved.read_text()
    assert "written by another spec" in refused("--resume", str(killed))
    resolved.write_text(original)
    # A finished training's result that does not read back.
    layout = CheckpointLayout(killed, training_key("centralized", "main", 0))
    (layout.coordinator_dir / "result.json").write_text("{")
    assert "unusable" in refused("--resume", str(killed))
    assert not (killed / "summary.json").exists() and read_status(killed)["state"] == "running"


def test_without_checkpoints_an_unfinished_training_starts_again(tmp_path: Path, run_cli) -> None:
    """``execution.checkpoints: false``: no parts; finished trainings are kept, the cut one is trained again."""
    text = _spec("sequential").replace("baseline: {centralized: true}\n", "")
    text = text.replace("reproducible_noise: true", "reproducible_noise: true, checkpoints: false")
    whole = run_spec_text(text, tmp_path / "whole")
    killed = _killed_run(tmp_path, text, 1, 2)
    assert not list(killed.rglob("round-*.pt"))
    assert run_cli("run", "--resume", str(killed), "--no-progress").returncode == 0
    assert _rounds(killed) == _rounds(whole)
    assert _epsilons(killed) == _epsilons(whole)
    assert _ledger(killed, "main-r1") == _ledger(whole, "main-r1")
    assert (killed / "ledger" / "main-r1.abandoned-1" / "ledger.sqlite").is_file()  # the cut chain is kept aside
    _verify(run_cli, killed)


def _opened_payloads(run_dir: Path, ledger: str) -> dict[str, list[tuple[str, int, str]]]:
    """Per holder: (kind, round, SHA-256 of the payload) of every opening, in order (what salted commitments hide)."""
    out = {}
    for folder in (run_dir, *sorted((run_dir / "sites").iterdir())):
        own = folder / "openings" / ledger
        lines = (own / "openings.jsonl").read_text().splitlines()
        out["server" if folder == run_dir else folder.name] = [
            (o["kind"], o["round"], hashlib.sha256((own / o["payload_file"]).read_bytes()).hexdigest())
            for o in map(json.loads, lines)
        ]
    return out


def test_with_secret_salts_the_resumed_ledger_commits_to_the_same_payloads(tmp_path: Path, run_cli) -> None:
    """Default mode (salts from the OS), no DP: the commitments differ, the payloads under them do not."""
    text = _spec("vectorized").replace("repeats: 2", "repeats: 1").replace("baseline: {centralized: true}\n", "")
    text = text.replace("reproducible_noise: true", "reproducible_noise: false")
    text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("privacy:"))
    whole = run_spec_text(text, tmp_path / "whole")
    killed = _killed_run(tmp_path, text, 0, random.Random("salts").randrange(1, 3))
    assert run_cli("run", "--resume", str(killed), "--no-progress").returncode == 0
    assert _rounds(killed) == _rounds(whole)
    assert _opened_payloads(killed, "main-r0") == _opened_payloads(whole, "main-r0")
    updates = [e for e in _ledger(killed, "main-r0") if e[0] == "site-update"]
    assert [e[:3] for e in updates] == [e[:3] for e in _ledger(whole, "main-r0") if e[0] == "site-update"]
    assert {e[3] for e in updates}.isdisjoint(e[3] for e in _ledger(whole, "main-r0"))  # fresh salts
    _verify(run_cli, killed)
