"""Random byte flips of a ``sqlite-chain`` ledger file, and what the verifier made of each.

Used by ``tests/test_ledger_fuzz.py`` (200 flips in CI) and ``benchmarks/ledger_fuzz.py``
(1,000). A flip *changes content* when a plain read of the table (every row in one
scan, plus the schema) gives anything other than the pristine rows, an error
included. The verifier must report every such flip (``detected``) and may never
raise (``crashed``); a flip that changes no content may go either way.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.plugins.ledgers.keys import TrustAnchor
from fedcore.plugins.ledgers.verify import LEDGER_FILE, _connect_readonly, verify_file


@dataclass
class FuzzTally:
    """Counts over all flips, and a few examples of what went wrong."""

    flips: int = 0
    changed: int = 0
    detected: int = 0
    detected_changed: int = 0
    crashed: int = 0
    missed: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"flips {self.flips}: content changed {self.changed}, detected {self.detected_changed}/{self.changed} "
            f"of those, {self.detected} reported in all, crashed {self.crashed}"
        )


def ledger_content(path: Path) -> Any:
    """What the file says: the schema and every row of one table scan, or the error reading it."""
    try:
        conn = _connect_readonly(path)
        try:
            schema = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
            rows = conn.execute("SELECT * FROM entries").fetchall()
            count = conn.execute("SELECT count(*) FROM entries").fetchone()
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - any failure to read is a change of content
        return ("unreadable", type(exc).__name__)
    return (schema, [tuple((type(v).__name__, v) for v in row) for row in rows], count)


def fuzz_ledger(ledger_dir: Path, anchor: TrustAnchor, flips: int, seed: int) -> FuzzTally:
    """Flip one random byte (XOR with a random non-zero value) of a copy of ``ledger_dir``'s file, ``flips`` times."""
    pristine = (ledger_dir / LEDGER_FILE).read_bytes()
    original = ledger_content(ledger_dir / LEDGER_FILE)
    rng = random.Random(seed)
    tally = FuzzTally()
    with tempfile.TemporaryDirectory(prefix="ledger-fuzz-") as scratch:
        for _ in range(flips):
            work = Path(scratch) / "ledger"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(ledger_dir, work, ignore=shutil.ignore_patterns(f"{LEDGER_FILE}*"))
            data = bytearray(pristine)
            offset = rng.randrange(len(data))
            mask = rng.randrange(1, 256)
            data[offset] ^= mask
            path = work / LEDGER_FILE
            path.write_bytes(bytes(data))
            changed = ledger_content(path) != original
            tally.flips += 1
            tally.changed += changed
            try:
                result = verify_file(path, anchor, None, workers=1)
            except Exception:  # noqa: BLE001 - counting crashes is the point
                tally.crashed += 1
                if len(tally.crashes) < 5:
                    tally.crashes.append(f"offset {offset} xor {mask:#04x}: {traceback.format_exc(limit=3)}")
                continue
            tally.detected += not result.ok
            tally.detected_changed += changed and not result.ok
            if changed and result.ok and len(tally.missed) < 5:
                tally.missed.append(f"offset {offset} xor {mask:#04x}: passed as ok")
            # sqlite may leave -shm/-wal files next to a copy it opened
            for extra in work.glob(f"{LEDGER_FILE}-*"):
                extra.unlink()
    return tally


def main_ledger(directory: Path, sites: int = 3, rounds: int = 8) -> Path:
    """Write a small realistic ledger (genesis, opening entries, ``rounds`` rounds) under ``directory``."""
    from fedcore.plugins.ledgers.sqlite_chain import SqliteChainLedger
    from fedcore.types import LedgerRecord

    ledger = SqliteChainLedger()
    ledger_dir = directory / "ledger" / "main-r0"
    ledger.open(ledger_dir, [f"site-{i}" for i in range(sites)])
    ledger.append([LedgerRecord(kind="spec", round=0, writer="server", payload_sha256="11" * 32)])
    for round_ in range(1, rounds + 1):
        records = [
            LedgerRecord(kind="site-update", round=round_, writer=f"site-{i}", payload_sha256=f"{round_:02x}{i:02x}" * 16,
                         metadata={"n_samples": 1, "bytes": 61708})
            for i in range(sites)
        ]
        records.append(LedgerRecord(kind="aggregate", round=round_, writer="server", payload_sha256="ab" * 32))
        records.append(LedgerRecord(kind="privacy-spent", round=round_, writer="server", payload_sha256="cd" * 32,
                                    metadata={"epsilon": 0.1 * round_, "delta": 1e-5, "unit": "site"}))
        ledger.append(records)
    ledger.close()
    with sqlite3.connect(ledger_dir / LEDGER_FILE) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return ledger_dir
