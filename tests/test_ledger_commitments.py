"""Hiding commitments on the ledger: a guessed update cannot be confirmed from the ledger,
the party that made each payload keeps its opening, an auditor given it verifies it, and
under central DP the coordinator commits to the model it released."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedcore.cli import cli
from fedcore.commitments import OPENINGS_FILE, SALT_BYTES, Committer, commitment
from fedcore.testing import run_spec_text
from fedcore.types import ClientUpdate, Weights

SPEC = """
name: commitments
seed: 5
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 200}}
model: {use: mlp, settings: {hidden: [8]}}
training: {rounds: 2, local_epochs: 1, batch_size: 64}
aggregator: {use: fedavg}
privacy:
  - use: central-dp
    settings: {epsilon: 4.0, delta: 1.0e-3, clip_norm: 0.5}
ledger: {use: sqlite-chain}
execution: {progress: false}
"""


def _update() -> ClientUpdate:
    delta = Weights(arrays={"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return ClientUpdate(site=0, round=1, delta=delta, n_samples=1)


def test_salts_are_fresh_by_default_and_seeded_only_in_reproducible_mode(tmp_path: Path) -> None:
    payload = _update().canonical_bytes()
    fresh = [Committer(None, False, 7, "main", 0).update("site-0", _update()) for _ in range(2)]
    assert fresh[0] != fresh[1]
    assert hashlib.sha256(payload).hexdigest() not in fresh  # not the plain digest
    seeded = [Committer(None, True, 7, "main", 0).update("site-0", _update()) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert Committer(None, True, 7, "other-arm", 0).update("site-0", _update()) != seeded[0]


def test_a_committer_keeps_the_opening_with_the_writer(tmp_path: Path) -> None:
    ledger_dir = tmp_path / "run" / "ledger" / "main-r0"
    digest = Committer(ledger_dir, False, 7, "main", 0).update("site-0", _update())
    folder = tmp_path / "run" / "sites" / "site-0" / "openings" / "main-r0"
    (line,) = (folder / OPENINGS_FILE).read_text().splitlines()
    opening = json.loads(line)
    assert len(bytes.fromhex(opening["salt"])) == SALT_BYTES
    assert commitment(bytes.fromhex(opening["salt"]), (folder / opening["payload_file"]).read_bytes()) == digest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_spec_text(SPEC, tmp_path_factory.mktemp("commitments") / "run")


def _entries(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "ledger" / "main-r0" / "ledger.sqlite") as conn:
        return conn.execute("SELECT seq, round, kind, writer, payload_sha256 FROM entries ORDER BY seq").fetchall()


def test_a_run_commits_and_each_party_holds_its_own_openings(run_dir: Path) -> None:
    entries = _entries(run_dir)
    updates = [e for e in entries if e[2] == "site-update"]
    assert len(updates) == 6
    for site in range(3):
        folder = run_dir / "sites" / f"site-{site}" / "openings" / "main-r0"
        openings = [json.loads(line) for line in (folder / OPENINGS_FILE).read_text().splitlines()]
        assert {o["writer"] for o in openings} == {f"site-{site}"} and len(openings) == 2
        for opening in openings:
            payload = (folder / opening["payload_file"]).read_bytes()
            # The true update, guessed exactly, does not match anything on the ledger without the salt.
            assert hashlib.sha256(payload).hexdigest() not in {e[4] for e in entries}
            assert opening["commitment"] in {e[4] for e in updates}
    coordinator = run_dir / "openings" / "main-r0" / OPENINGS_FILE
    assert {json.loads(line)["writer"] for line in coordinator.read_text().splitlines()} == {"server"}


def test_central_dp_aggregate_commits_to_the_released_model(run_dir: Path) -> None:
    folder = run_dir / "openings" / "main-r0"
    last = [json.loads(line) for line in (folder / OPENINGS_FILE).read_text().splitlines() if '"aggregate"' in line][-1]
    released = Weights.from_bytes((folder / last["payload_file"]).read_bytes())
    final = np.load(run_dir / "checkpoints" / "federated-main-r0.npz")
    assert all(np.array_equal(released.arrays[k], final[k]) for k in released.names)


def test_an_auditor_verifies_openings_and_catches_a_false_one(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for holder in ("sites/site-1", "openings"):
        ok = runner.invoke(cli, ["ledger", "verify", str(run_dir), "--openings", str(run_dir / holder)])
        assert ok.exit_code == 0, ok.output
        assert "openings open their commitments" in ok.output
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    folder = copy / "sites" / "site-2" / "openings" / "main-r0"
    payload = folder / json.loads((folder / OPENINGS_FILE).read_text().splitlines()[0])["payload_file"]
    data = bytearray(payload.read_bytes())
    data[-1] ^= 1  # a site that claims it sent something else
    payload.write_bytes(bytes(data))
    bad = runner.invoke(cli, ["ledger", "verify", str(copy), "--openings", str(copy / "sites" / "site-2")])
    assert bad.exit_code == 1 and "is not the commitment" in bad.output
    (tmp_path / "empty").mkdir()
    none = runner.invoke(cli, ["ledger", "verify", str(copy), "--openings", str(tmp_path / "empty")])
    assert none.exit_code == 2 and "no openings.jsonl" in none.output
