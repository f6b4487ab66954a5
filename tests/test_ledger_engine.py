"""A fresh run's ledger verifies end to end, and Table II's numbers come from the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.engine.runner import run_experiment
from fedcore.spec import load_experiment

SPEC = """
name: ledger-e2e
seed: 3
data: {use: synthetic-ehr, settings: {sites: 3, patients_per_site: 200}}
training: {rounds: 3, local_epochs: 1, batch_size: 64}
ledger: {use: sqlite-chain}
execution: {progress: false, checkpoints: false}
"""


@pytest.mark.slow
def test_fresh_run_ledger_verifies_with_the_cli(tmp_path: Path) -> None:
    run_dir = run_experiment(load_experiment(None, [], text=SPEC), out=tmp_path / "run", workers=1, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = summary["arms"][0]["federated"]["runs"][0]["ledger"]
    import sqlite3

    db = run_dir / "ledger" / "main-r0" / "ledger.sqlite"
    with sqlite3.connect(db) as conn:
        kinds = [k for (k,) in conn.execute("SELECT kind FROM entries ORDER BY seq")]
    # genesis + (spec, initial model, preprocessing statistics) + 3 rounds x (3 site updates + aggregate)
    assert kinds.count("site-update") == 9 and kinds.count("aggregate") == 3
    assert ledger["entries"] == len(kinds) == 1 + 2 + kinds.count("preprocessing") + 3 * 4
    assert ledger["transactions"] == 1 + 1 + 3
    assert ledger["consensus"].startswith("none: single-writer signed hash chain")
    assert ledger["head"] in (run_dir / "report.md").read_text()
    fedcore = Path(sys.executable).with_name("fedcore")
    anchor = run_dir / "ledger" / "main-r0" / "public-keys.json"
    ok = subprocess.run([str(fedcore), "ledger", "verify", str(run_dir), "--keys", str(anchor)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "head checked: " + str(run_dir / "summary.json") in ok.stdout  # the run's own signed head, by default
    ok = subprocess.run([str(fedcore), "ledger", "verify", str(db), "--keys", str(anchor), "--head", ledger["head"]],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    target = kinds.index("site-update") + 1  # site-1's round-1 update
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE entries SET payload_sha256 = ? WHERE seq = ?", ("0" * 64, target))
    bad = subprocess.run([str(fedcore), "ledger", "verify", str(run_dir), "--keys", str(anchor)], capture_output=True, text=True)
    assert bad.returncode == 1 and f"TAMPERED: entry {target}" in bad.stderr
