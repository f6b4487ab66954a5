"""The verifier against an adversary who edits bytes, not rows: rewritten row ids, random
flips, forged or missing heads. Every content change is reported, nothing crashes."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedcore.plugins.ledgers.fuzz import fuzz_ledger, main_ledger
from fedcore.plugins.ledgers.keys import PUBLIC_KEYS_FILE, TrustAnchor
from fedcore.plugins.ledgers.verify import HEADS_FILE, LEDGER_FILE, verify_file, verify_target


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return main_ledger(tmp_path_factory.mktemp("pristine") / "run", rounds=4)


@pytest.fixture
def ledger_dir(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine.parent.parent, tmp_path / "run")
    return tmp_path / "run" / "ledger" / "main-r0"


def anchor_of(ledger_dir: Path) -> TrustAnchor:
    return TrustAnchor.load(ledger_dir / PUBLIC_KEYS_FILE)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        byte = data[at + i]
        if i == 8:
            return (value << 8) | byte, at + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    raise AssertionError("unreachable")


def rewrite_rowid_in_place(db: Path, old: int, new: int) -> None:
    """Overwrite one row's id inside its B-tree leaf cell (the page is left out of order)."""
    data = bytearray(db.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    for start in range(0, len(data), page_size):
        header = start + (100 if start == 0 else 0)
        if data[header] != 0x0D:  # a table leaf page
            continue
        cells = int.from_bytes(data[header + 3 : header + 5], "big")
        for c in range(cells):
            cell = start + int.from_bytes(data[header + 8 + 2 * c : header + 10 + 2 * c], "big")
            _, at = _varint(data, cell)
            rowid, end = _varint(data, at)
            if rowid == old:
                assert end - at == 1 and new < 0x80
                data[at] = new
                db.write_bytes(bytes(data))
                return
    raise AssertionError(f"row {old} not found")


def test_a_rewritten_row_id_is_caught_where_it_sits(ledger_dir: Path) -> None:
    db = ledger_dir / LEDGER_FILE
    rewrite_rowid_in_place(db, 5, 99)
    with sqlite3.connect(db) as conn:  # an ordered range query now silently skips that row
        assert 5 not in [s for (s,) in conn.execute("SELECT seq FROM entries WHERE seq BETWEEN 0 AND 30 ORDER BY seq")]
    result = verify_file(db, anchor_of(ledger_dir), None, workers=1)
    assert (result.ok, result.first_bad_sequence) == (False, 5), result.message
    assert "found 99" in result.message


def test_the_runs_signed_head_in_summary_is_checked_by_default(ledger_dir: Path) -> None:
    db = ledger_dir / LEDGER_FILE
    run_dir = ledger_dir.parent.parent
    from fedcore.plugins.ledgers.sqlite_chain import SqliteChainLedger

    # The final head as the run records it (sqlite-chain's summary, inside summary.json).
    ledger = SqliteChainLedger()
    ledger.open(ledger_dir, ["site-0", "site-1", "site-2"])
    from fedcore.types import LedgerRecord

    ledger.append([LedgerRecord(kind="run-end", round=5, writer="server", payload_sha256="ef" * 32)])
    summary = ledger.close()
    assert summary["head_signature"] and summary["ledger_id"]
    (run_dir / "summary.json").write_text(json.dumps({"arms": [{"federated": {"runs": [{"ledger": summary}]}}]}))
    ok = verify_target(run_dir, None, None, workers=1)
    assert ok.ok and "summary.json" in ok.message, ok.message

    with sqlite3.connect(db) as conn:  # the attacker drops the last entry and wipes heads.jsonl
        conn.execute("DELETE FROM entries WHERE seq = (SELECT max(seq) FROM entries)")
    (ledger_dir / HEADS_FILE).unlink()
    truncated = verify_target(run_dir, None, None, workers=1)
    last = int(summary["head"].split(":")[0])
    assert (truncated.ok, truncated.first_bad_sequence) == (False, last), truncated.message

    forged = dict(summary, head=f"{last - 1}:" + "ab" * 32)  # a head the server never signed
    (run_dir / "summary.json").write_text(json.dumps({"arms": [{"federated": {"runs": [{"ledger": forged}]}}]}))
    result = verify_target(run_dir, None, None, workers=1)
    assert not result.ok and "not signed by the server's expected key" in result.message


def test_no_head_is_said(ledger_dir: Path) -> None:
    (ledger_dir / HEADS_FILE).unlink()
    result = verify_target(ledger_dir.parent.parent, None, None, workers=1)
    assert result.ok and "no head checked" in result.message


def test_entries_appended_after_the_final_head_are_caught(ledger_dir: Path) -> None:
    lines = (ledger_dir / HEADS_FILE).read_text().splitlines()
    (ledger_dir / HEADS_FILE).write_text("\n".join(lines[:-1]) + "\n")  # the newest head is dropped...
    result = verify_target(ledger_dir.parent.parent, None, None, workers=1)
    # ...so the entries of the last append look appended after the run's final head
    assert not result.ok and "appended later" in result.message


def test_garbage_heads_and_summary_do_not_crash(ledger_dir: Path) -> None:
    (ledger_dir / HEADS_FILE).write_bytes(b'{"sequence": "\xff\xfe", "entry_hash": 3}\n')
    (ledger_dir.parent.parent / "summary.json").write_bytes(b"\x00not json")
    result = verify_target(ledger_dir.parent.parent, None, None, workers=1)
    assert not result.ok and "not signed" in result.message


def test_200_random_byte_flips_all_detected_none_crash(pristine: Path) -> None:
    tally = fuzz_ledger(pristine, anchor_of(pristine), flips=200, seed=13)
    assert tally.crashed == 0, tally.crashes
    assert tally.changed > 50, tally.line()  # the flips did hit content
    assert tally.detected_changed == tally.changed, (tally.line(), tally.missed)


def test_the_first_bad_entry_is_named_when_a_later_row_is_unreadable(ledger_dir: Path) -> None:
    db = ledger_dir / LEDGER_FILE
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE entries SET payload_sha256 = ? WHERE seq = 3", ("0" * 64,))
    conn.close()  # the last connection checkpoints the WAL into the file
    rewrite_rowid_in_place(db, 10, 99)
    result = verify_file(db, anchor_of(ledger_dir), None, workers=1)
    assert (result.ok, result.first_bad_sequence) == (False, 3), result.message
