"""sqlite-chain: every tamper case is caught at the right sequence number, and `fedcore ledger verify`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedcore.cli import cli
from fedcore.plugins.ledgers.chain import canonical_bytes, canonical_json, entry_hash, metadata_text
from fedcore.plugins.ledgers.keys import KeyRing, default_keys_dir, sign
from fedcore.plugins.ledgers.sqlite_chain import SqliteChainLedger
from fedcore.plugins.ledgers.verify import COLUMNS, verify_target
from fedcore.types import LedgerRecord

PARTICIPANTS = ["server", "site-0", "site-1", "site-2"]
ROUNDS = 4


def _round_records(round_: int) -> list[LedgerRecord]:
    records = [
        LedgerRecord(
            kind="site-update",
            round=round_,
            writer=f"site-{i}",
            payload_sha256=f"{round_:02d}{i:02d}" * 16,
            metadata={"n_samples": 100 + i, "bytes": 4096},
        )
        for i in range(3)
    ]
    records.append(LedgerRecord(kind="aggregate", round=round_, writer="server", payload_sha256="ab" * 32))
    records.append(
        LedgerRecord(
            kind="privacy-spent", round=round_, writer="server", payload_sha256="cd" * 32,
            metadata={"epsilon": 0.25 * round_, "delta": 1e-5, "unit": "record", "note": "über"},
        )
    )
    return records


def write_ledger(run_dir: Path, algorithm: str = "ed25519") -> tuple[SqliteChainLedger, dict]:
    ledger = SqliteChainLedger(SqliteChainLedger.Settings(algorithm=algorithm))
    ledger.open(run_dir / "ledger" / "main-r0", PARTICIPANTS[1:])
    ledger.append(
        [
            LedgerRecord(kind="spec", round=0, writer="server", payload_sha256="11" * 32),
            LedgerRecord(kind="global-model", round=0, writer="server", payload_sha256="22" * 32),
        ]
    )
    for round_ in range(1, ROUNDS + 1):
        head = ledger.append(_round_records(round_))
    summary = ledger.close()
    assert summary["head"] == f"{head.sequence}:{head.entry_hash}"
    return ledger, summary


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("pristine")
    _, summary = write_ledger(run_dir)
    return run_dir, summary


@pytest.fixture
def run(pristine: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    """A private copy of the pristine ledger to tamper with; keys copied out as the hospital's anchor."""
    source, summary = pristine
    shutil.copytree(source, tmp_path / "run")
    shutil.copy(source / "ledger" / "main-r0" / "public-keys.json", tmp_path / "anchor.json")
    return tmp_path / "run", summary


def db_of(run_dir: Path) -> Path:
    return run_dir / "ledger" / "main-r0" / "ledger.sqlite"


def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM entries ORDER BY seq").fetchall()


def rewrite(db: Path, new_rows: list[tuple]) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM entries")
        conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)", new_rows)
    conn.close()


def check(run_dir: Path, anchor: Path, head: str | None = None):
    return verify_target(run_dir, anchor, head, workers=1)


def test_fresh_ledger_verifies(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, summary = run
    result = check(run_dir, tmp_path / "anchor.json", summary["head"])
    assert result.ok, result.message
    assert result.entries == 1 + 2 + 5 * ROUNDS == summary["entries"]
    assert summary["transactions"] == 2 + ROUNDS
    assert summary["consensus"].startswith("none: single-writer signed hash chain")


def test_private_keys_are_owner_only_outside_the_run_and_anchor_is_separate(run: tuple[Path, dict]) -> None:
    run_dir, summary = run
    keys = default_keys_dir("ed25519")
    assert summary["keys_dir"] == str(keys.resolve())
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    for name in PARTICIPANTS:
        assert stat.S_IMODE(os.stat(keys / f"{name}.key.pem").st_mode) == 0o600
    assert not [p for p in run_dir.rglob("*") if p.is_file() and b"PRIVATE" in p.read_bytes()]
    anchor_file = run_dir / "ledger" / "main-r0" / "public-keys.json"
    assert sorted(json.loads(anchor_file.read_text())["keys"]) == PARTICIPANTS


def test_keys_dir_inside_the_run_is_refused_and_no_key_file_is_overwritten(tmp_path: Path) -> None:
    from fedcore.errors import DataError

    inside = SqliteChainLedger(SqliteChainLedger.Settings(keys_dir=str(tmp_path / "run" / "keys")))
    with pytest.raises(DataError, match="must not live in the run directory"):
        inside.open(tmp_path / "run" / "ledger" / "main-r0", ["site-0"])
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    (elsewhere / "public-keys.json").write_text("someone else's file")
    (elsewhere / "server.key.pem").write_text("not ours")
    ledger = SqliteChainLedger(SqliteChainLedger.Settings(keys_dir=str(elsewhere)))
    with pytest.raises(DataError, match="unreadable private key"):
        ledger.open(tmp_path / "run2" / "ledger" / "main-r0", ["site-0"])
    assert (elsewhere / "public-keys.json").read_text() == "someone else's file"
    assert (elsewhere / "server.key.pem").read_text() == "not ours"


COLUMN_NAMES = [c.strip() for c in COLUMNS.split(",")]


@pytest.mark.parametrize("column", COLUMN_NAMES)
@pytest.mark.parametrize("seq", [0, 3, 12])
def test_one_changed_byte_in_any_field_is_caught(run: tuple[Path, dict], tmp_path: Path, column: str, seq: int) -> None:
    run_dir, _ = run
    db = db_of(run_dir)
    table = rows(db)
    index = COLUMN_NAMES.index(column)
    row = list(table[seq])
    value = row[index]
    if isinstance(value, int):
        # seq itself: moving an entry to a free sequence number leaves a gap at ``seq``
        row[index] = value + (1000 if column == "seq" else 1)
    else:
        text = str(value)
        middle = len(text) // 2
        row[index] = text[:middle] + ("A" if text[middle] != "A" else "B") + text[middle + 1 :]
    table[seq] = tuple(row)
    rewrite(db, table)
    result = check(run_dir, tmp_path / "anchor.json")
    assert not result.ok
    assert result.first_bad_sequence == seq, result.message


def test_reformatted_metadata_is_caught(run: tuple[Path, dict], tmp_path: Path) -> None:
    """Same meaning, different bytes: still an edit."""
    run_dir, _ = run
    db = db_of(run_dir)
    table = rows(db)
    row = list(table[5])
    row[5] = json.dumps(json.loads(row[5]), indent=1)
    table[5] = tuple(row)
    rewrite(db, table)
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, 5)


def test_deleted_entry_is_caught(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = run
    db = db_of(run_dir)
    rewrite(db, [r for r in rows(db) if r[0] != 7])
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, 7)


def test_deleted_and_renumbered_entries_are_caught(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = run
    db = db_of(run_dir)
    table = [r for r in rows(db) if r[0] != 7]
    table = [(i, *r[1:]) for i, r in enumerate(table)]
    rewrite(db, table)
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, 7)


def test_two_reordered_entries_are_caught(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = run
    db = db_of(run_dir)
    table = rows(db)
    a, b = table[8], table[9]
    table[8], table[9] = (8, *b[1:]), (9, *a[1:])
    rewrite(db, table)
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, 8)


def test_inserted_entry_with_valid_hash_and_forged_signature_is_caught(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = run
    db = db_of(run_dir)
    table = rows(db)
    ledger_id = json.loads(table[0][5])["ledger_id"]
    prev = table[5][8]
    fields = dict(ledger_id=ledger_id, seq=6, round=1, kind="site-update", writer="site-1",
                  payload_sha256="ee" * 32, metadata_json="{}", prev_hash=prev, time_ns=table[5][7] + 1)
    canonical = canonical_bytes(**fields)
    # The attacker holds site-2's key, not site-1's.
    attacker = KeyRing(default_keys_dir("ed25519"), "ed25519")
    attacker.ensure(["site-2"])
    forged = (6, 1, "site-update", "site-1", "ee" * 32, "{}", prev, fields["time_ns"], entry_hash(canonical),
              base64.b64encode(sign(attacker.private("site-2"), canonical)).decode())
    shifted = [(r[0] + 1, *r[1:]) for r in table[6:]]
    rewrite(db, table[:6] + [forged] + shifted)
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, 6), result.message


def test_truncated_tail_is_caught_against_the_head(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, summary = run
    db = db_of(run_dir)
    table = rows(db)
    rewrite(db, table[:-5])  # the whole last round: a shorter chain that is valid in itself
    (db.parent / "heads.jsonl").write_text("")  # the attacker also wipes the heads kept next to it
    alone = check(run_dir, tmp_path / "anchor.json")
    assert alone.ok and "no head checked" in alone.message  # nothing inside the ledger reveals it...
    result = check(run_dir, tmp_path / "anchor.json", summary["head"])  # ...the head the hospital kept does
    assert (result.ok, result.first_bad_sequence) == (False, len(table) - 5)


def test_truncation_caught_by_heads_file(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = run
    db = db_of(run_dir)
    table = rows(db)
    rewrite(db, table[:-2])
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, len(table) - 2)


def test_entry_resigned_with_another_sites_key_is_caught(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = run
    db = db_of(run_dir)
    table = rows(db)
    seq = next(r[0] for r in table if r[3] == "site-1" and r[1] == 2)
    entry = table[seq]
    ledger_id = json.loads(table[0][5])["ledger_id"]
    canonical = canonical_bytes(ledger_id=ledger_id, seq=entry[0], round=entry[1], kind=entry[2], writer=entry[3],
                                payload_sha256=entry[4], metadata_json=entry[5], prev_hash=entry[6], time_ns=entry[7])
    ring = KeyRing(default_keys_dir("ed25519"), "ed25519")
    ring.ensure(["site-2"])
    table[seq] = (*entry[:9], base64.b64encode(sign(ring.private("site-2"), canonical)).decode())
    rewrite(db, table)
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, seq)
    assert "site-1's expected key" in result.message


def test_substituted_key_in_header_is_caught(run: tuple[Path, dict], tmp_path: Path) -> None:
    """The attacker swaps site-1's key in the header and re-signs everything consistently."""
    run_dir, _ = run
    db = db_of(run_dir)
    table = rows(db)
    ring = KeyRing(tmp_path / "attacker-keys", "ed25519")
    ring.ensure(["server", "site-1"])
    header = json.loads(table[0][5])
    from fedcore.plugins.ledgers.keys import fingerprint, public_pem

    for name in ("server", "site-1"):
        header["participants"][name] = {"fingerprint": fingerprint(ring.public(name)), "public_key_pem": public_pem(ring.public(name))}
    ledger_id = header["ledger_id"]
    import hashlib

    new_rows = []
    prev = "0" * 64
    for r in table:
        meta = metadata_text(header) if r[0] == 0 else r[5]
        payload = hashlib.sha256(canonical_json(header)).hexdigest() if r[0] == 0 else r[4]
        canonical = canonical_bytes(ledger_id=ledger_id, seq=r[0], round=r[1], kind=r[2], writer=r[3],
                                    payload_sha256=payload, metadata_json=meta, prev_hash=prev, time_ns=r[7])
        signer = r[3] if r[3] in ("server", "site-1") else None
        signature = base64.b64encode(sign(ring.private(signer), canonical)).decode() if signer else r[9]
        digest = entry_hash(canonical)
        new_rows.append((r[0], r[1], r[2], r[3], payload, meta, prev, r[7], digest, signature))
        prev = digest
    rewrite(db, new_rows)
    result = check(run_dir, tmp_path / "anchor.json")
    assert (result.ok, result.first_bad_sequence) == (False, 0)
    assert "substituted" in result.message


def test_spec_fingerprints_are_a_trust_anchor(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = run
    anchor = json.loads((tmp_path / "anchor.json").read_text())
    fingerprints = {name: entry["fingerprint"] for name, entry in anchor["keys"].items()}
    (run_dir / "spec.resolved.yaml").write_text(
        json.dumps({"ledger": {"use": "sqlite-chain", "settings": {"trusted_fingerprints": fingerprints}}})
    )
    (run_dir / "ledger" / "main-r0" / "public-keys.json").unlink()  # nothing of the run's own key files is needed
    result = verify_target(run_dir, None, None, workers=1)
    assert result.ok, result.message
    fingerprints["site-2"] = "sha256:" + "0" * 64
    (run_dir / "spec.resolved.yaml").write_text(
        json.dumps({"ledger": {"use": "sqlite-chain", "settings": {"trusted_fingerprints": fingerprints}}})
    )
    result = verify_target(run_dir, None, None, workers=1)
    assert (result.ok, result.first_bad_sequence) == (False, 0)


def test_site_update_signed_with_unexpected_key_is_rejected_and_recorded(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    ring = KeyRing(keys, "ed25519")
    ring.ensure(PARTICIPANTS)
    from fedcore.plugins.ledgers.keys import fingerprint

    trusted = {p: fingerprint(ring.public(p)) for p in PARTICIPANTS}
    (keys / "site-1.key.pem").unlink()  # site-1's key is replaced by one the federation never agreed on
    ledger = SqliteChainLedger(SqliteChainLedger.Settings(keys_dir=str(keys), trusted_fingerprints=trusted))
    ledger.open(tmp_path / "run" / "ledger" / "main-r0", PARTICIPANTS[1:])
    ledger.append(_round_records(1))
    summary = ledger.close()
    assert summary["rejected_updates"] == 1
    table = rows(tmp_path / "run" / "ledger" / "main-r0" / "ledger.sqlite")
    rejected = [r for r in table if r[2] == "site-update-rejected"]
    assert len(rejected) == 1 and rejected[0][3] == "server" and json.loads(rejected[0][5])["claimed_writer"] == "site-1"
    # ...and the ledger, checked against the agreed fingerprints, is intact.
    anchor = tmp_path / "run" / "spec.resolved.yaml"
    anchor.write_text(json.dumps({"ledger": {"settings": {"trusted_fingerprints": trusted}}}))
    assert verify_target(tmp_path / "run", None, None, workers=1).ok


def test_parallel_verification_finds_the_same_entry(tmp_path: Path) -> None:
    ledger = SqliteChainLedger(SqliteChainLedger.Settings(algorithm="ecdsa-p256"))
    ledger.open(tmp_path / "ledger" / "main-r0", PARTICIPANTS[1:])
    for round_ in range(1, 1001):
        ledger.append(_round_records(round_))
    ledger.close()
    db = db_of(tmp_path)
    assert verify_target(tmp_path, None, None, workers=2).ok
    table = rows(db)
    table[3333] = (*table[3333][:4], "ff" * 32, *table[3333][5:])
    rewrite(db, table)
    result = verify_target(tmp_path, None, None, workers=2)
    assert (result.ok, result.first_bad_sequence) == (False, 3333)


def test_canonical_template_equals_canonical_json() -> None:
    fields = dict(ledger_id="id", seq=3, round=1, kind="site-update", writer="site-0", payload_sha256="ab" * 32,
                  prev_hash="cd" * 32, time_ns=1_700_000_000_000_000_000)
    metadata = {"z": 1.5, "a": "é\"\\\n", "nested": {"b": [1, 2], "a": None}}
    expected = canonical_json({"format": "fedcore-ledger-entry-v1", "metadata": metadata, **fields})
    assert canonical_bytes(metadata_json=metadata_text(metadata), **fields) == expected


# ------------------------------------------------------------------- CLI


def test_cli_exit_codes(run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, summary = run
    (run_dir / "spec.resolved.yaml").write_text("ledger: {use: sqlite-chain}\n")
    runner = CliRunner()
    ok = runner.invoke(cli, ["ledger", "verify", str(run_dir), "--keys", str(tmp_path / "anchor.json"), "--head", summary["head"]])
    assert ok.exit_code == 0, ok.output
    assert f"ok: {summary['entries']} entries verified" in ok.output
    bad_head = runner.invoke(cli, ["ledger", "verify", str(run_dir), "--head", "nonsense"])
    assert bad_head.exit_code == 2
    not_a_ledger = tmp_path / "junk.sqlite"
    not_a_ledger.write_bytes(b"not a database at all" * 10)
    junk = runner.invoke(cli, ["ledger", "verify", str(not_a_ledger), "--ledger", "sqlite-chain", "--keys", str(tmp_path / "anchor.json")])
    assert junk.exit_code == 1 and "TAMPERED: entry 0" in junk.output and "unreadable ledger" in junk.output
    db = db_of(run_dir)
    rewrite(db, [r for r in rows(db) if r[0] != 4])
    tampered = runner.invoke(cli, ["ledger", "verify", str(db), "--keys", str(tmp_path / "anchor.json")])
    assert tampered.exit_code == 1
    assert "TAMPERED: entry 4" in tampered.output
