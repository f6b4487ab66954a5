"""Re-checking a ``sqlite-chain`` ledger from its file, the expected keys and a signed head.

Per entry, at position ``i`` of the chain: its sequence number is ``i`` (else an
entry was deleted, inserted or reordered), its canonical bytes hash to the
stored hash (else a field was edited), it links to entry ``i-1``, its writer is
a participant of the header, and its signature verifies with the writer's
*expected* key. Entry 0 is the header: every key it lists must match the trust
anchor. A head ``SEQ:HASH`` received earlier must still be on the chain (else
the tail was truncated or rewritten).

Signature checks dominate (tens of microseconds each), so chunks of the chain
are checked in a process pool using every core; each worker reads its rows
straight from the SQLite file (read-only) and the links between chunks are
checked afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fedcore.components import LedgerVerification
from fedcore.errors import DataError
from fedcore.plugins.ledgers.chain import GENESIS_PREV, Entry, canonical_json, entry_hash, head_message, parse_head
from fedcore.plugins.ledgers.keys import (
    PUBLIC_KEYS_FILE,
    TrustAnchor,
    fingerprint,
    load_public_pem,
    public_pem,
    verify_signature,
)

LEDGER_FILE = "ledger.sqlite"
HEADS_FILE = "heads.jsonl"
#: below this many entries a process pool costs more than it saves
PARALLEL_THRESHOLD = 4000
COLUMNS = "seq, round, kind, writer, payload_sha256, metadata, prev_hash, time_ns, entry_hash, signature"


@dataclass(frozen=True)
class Problem:
    position: int
    message: str


@dataclass(frozen=True)
class ChunkResult:
    first_position: int
    count: int
    first_prev: str
    last_hash: str
    problem: Problem | None


def _connect_readonly(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def check_chunk(
    path: str, ledger_id: str, keys_pem: dict[str, str], first_position: int, seq_lo: int, seq_hi: int
) -> ChunkResult:
    """Check entries with ``seq_lo <= seq <= seq_hi``, the first of which sits at ``first_position``."""
    keys = {name: load_public_pem(pem) for name, pem in keys_pem.items()}
    conn = _connect_readonly(Path(path))
    rows = conn.execute(f"SELECT {COLUMNS} FROM entries WHERE seq BETWEEN ? AND ? ORDER BY seq", (seq_lo, seq_hi)).fetchall()
    conn.close()
    problem: Problem | None = None
    prev_computed: str | None = None
    first_prev = rows[0][6] if rows else ""
    for offset, row in enumerate(rows):
        position = first_position + offset
        message, computed = _check_entry(Entry(*row), position, ledger_id, keys, prev_computed)
        if message is not None:
            problem = Problem(position, message)
            break
        prev_computed = computed
    return ChunkResult(first_position, len(rows), first_prev, prev_computed or "", problem)


def _check_entry(
    entry: Entry, position: int, ledger_id: str, keys: dict, prev_computed: str | None
) -> tuple[str | None, str]:
    """(problem or None, the entry's recomputed hash)."""
    if entry.seq != position:
        return f"expected sequence {position}, found {entry.seq}: an entry was deleted, inserted or reordered", ""
    try:
        canonical = entry.canonical_bytes(ledger_id)
    except (ValueError, TypeError):
        return "a field has the wrong type (edited)", ""
    computed = entry_hash(canonical)
    if computed != entry.entry_hash:
        return "content does not match its stored hash (edited)", computed
    if position == 0:
        prev_computed = GENESIS_PREV
    if prev_computed is not None and entry.prev_hash != prev_computed:
        return f"does not link to entry {position - 1} (inserted, deleted or reordered)", computed
    key = keys.get(entry.writer)
    if key is None:
        return f"writer '{entry.writer}' has no expected key", computed
    try:
        signature = base64.b64decode(entry.signature, validate=True)
    except (ValueError, TypeError):
        return "signature is not base64 (edited)", computed
    if not verify_signature(key, signature, canonical):
        return f"signature does not verify with {entry.writer}'s expected key", computed
    return None, computed


def _header_keys(genesis: Entry, anchor: TrustAnchor) -> tuple[str, dict[str, str], Problem | None]:
    """The ledger id and the verification keys from entry 0, checked against the trust anchor."""
    try:
        header = json.loads(genesis.metadata_json)
        ledger_id = str(header["ledger_id"])
        participants = dict(header["participants"])
    except (ValueError, KeyError, TypeError):
        return "", {}, Problem(0, "header (entry 0) is unreadable")
    if genesis.seq != 0 or genesis.kind != "genesis" or genesis.writer != "server":
        return ledger_id, {}, Problem(0, "entry 0 is not the server's genesis header")
    if hashlib.sha256(canonical_json(header)).hexdigest() != genesis.payload_sha256:
        return ledger_id, {}, Problem(0, "header does not match its digest (edited)")
    keys: dict[str, str] = {}
    for name, info in sorted(participants.items()):
        expected = anchor.expected_fingerprint(name)
        if expected is None:
            return ledger_id, {}, Problem(0, f"no expected key for participant '{name}' in {anchor.source}")
        pem = (info or {}).get("public_key_pem")
        listed = (info or {}).get("fingerprint")
        if listed != expected or (pem is not None and fingerprint(load_public_pem(pem)) != expected):
            return ledger_id, {}, Problem(0, f"header key of '{name}' is not the expected key (substituted)")
        anchor_key = anchor.keys.get(name)
        if anchor_key is not None:
            keys[name] = public_pem(anchor_key)
        elif pem is not None:
            keys[name] = pem
    return ledger_id, keys, None


def verify_file(path: Path, anchor: TrustAnchor, head: tuple[int, str] | None, workers: int | None = None) -> LedgerVerification:
    """Verify one ledger file; unusable input raises :class:`DataError`."""
    try:
        conn = _connect_readonly(path)
        seqs = [row[0] for row in conn.execute("SELECT seq FROM entries ORDER BY seq")]
        first = conn.execute(f"SELECT {COLUMNS} FROM entries ORDER BY seq LIMIT 1").fetchone()
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise DataError(f"not a sqlite-chain ledger ({exc})", where=str(path), hint=f"pass a {LEDGER_FILE} or a run directory") from None
    if first is None:
        return LedgerVerification(ok=False, entries=0, first_bad_sequence=0, message=f"{path}: the ledger is empty")
    ledger_id, keys, problem = _header_keys(Entry(*first), anchor)
    if problem is not None:
        return LedgerVerification(False, len(seqs), problem.position, f"{path}: entry 0: {problem.message}")
    chunks = _plan_chunks(seqs, workers)
    args = [(str(path), ledger_id, keys, start, seqs[start], seqs[end - 1]) for start, end in chunks]
    if len(chunks) == 1:
        results = [check_chunk(*args[0])]
    else:
        with ProcessPoolExecutor(max_workers=_workers(workers), mp_context=_context()) as pool:
            results = list(pool.map(check_chunk, *zip(*args)))
    problems = [r.problem for r in results if r.problem is not None]
    for before, after in zip(results, results[1:]):
        if after.count and after.first_prev != before.last_hash:
            problems.append(Problem(after.first_position, f"does not link to entry {after.first_position - 1} (inserted, deleted or reordered)"))
    if head is not None:
        problems += _check_head(path, seqs, head)
    problems += _check_heads_file(path, seqs, ledger_id, keys)
    if problems:
        worst = min(problems, key=lambda p: p.position)
        return LedgerVerification(False, len(seqs), worst.position, f"{path}: {worst.message}")
    return LedgerVerification(True, len(seqs), None, "")


def _check_head(path: Path, seqs: list[int], head: tuple[int, str]) -> list[Problem]:
    sequence, expected_hash = head
    if sequence >= len(seqs):
        return [Problem(len(seqs), f"truncated: the head names entry {sequence} but the chain ends at {len(seqs) - 1}")]
    conn = _connect_readonly(path)
    row = conn.execute("SELECT entry_hash FROM entries WHERE seq = ?", (sequence,)).fetchone()
    conn.close()
    if row is None or row[0] != expected_hash:
        return [Problem(sequence, f"entry {sequence} is not the one the head {sequence}:{expected_hash[:12]}... names (rewritten)")]
    return []


def _check_heads_file(path: Path, seqs: list[int], ledger_id: str, keys: dict[str, str]) -> list[Problem]:
    """The newest signed head kept next to the ledger, when it is there (``--head`` is the independent check)."""
    heads = path.parent / HEADS_FILE
    if not heads.is_file() or "server" not in keys:
        return []
    lines = [line for line in heads.read_text().splitlines() if line.strip()]
    if not lines:
        return []
    try:
        newest = json.loads(lines[-1])
        sequence, digest, signature = int(newest["sequence"]), str(newest["entry_hash"]), str(newest["signature"])
        valid = verify_signature(load_public_pem(keys["server"]), base64.b64decode(signature), head_message(ledger_id, sequence, digest))
    except (ValueError, KeyError, TypeError):
        valid = False
        sequence, digest = len(seqs), ""
    if not valid:
        return [Problem(min(sequence, len(seqs)), f"the newest head in {HEADS_FILE} is not signed by the server's expected key")]
    return _check_head(path, seqs, (sequence, digest))


def _plan_chunks(seqs: list[int], workers: int | None) -> list[tuple[int, int]]:
    n = len(seqs)
    if n < PARALLEL_THRESHOLD or _workers(workers) <= 1:
        return [(0, n)]
    parts = _workers(workers) * 4
    size = -(-n // parts)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _workers(workers: int | None) -> int:
    return max(1, workers or len(os.sched_getaffinity(0)))


def _context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds; verification runs no threads of its own.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


# -------------------------------------------------------------- targets


def ledger_files(target: Path) -> list[Path]:
    """The ledger files of a run directory, a ledger directory or a ledger file."""
    if target.is_file():
        return [target]
    if (target / LEDGER_FILE).is_file():
        return [target / LEDGER_FILE]
    found = sorted((target / "ledger").glob(f"*/{LEDGER_FILE}")) if (target / "ledger").is_dir() else []
    if not found:
        raise DataError(f"no {LEDGER_FILE} found", where=str(target), hint="pass a run directory written with a sqlite-chain ledger, or the ledger file")
    return found


def _spec_anchor(target: Path) -> TrustAnchor | None:
    """Fingerprints from ``ledger.settings.trusted_fingerprints`` of the run's resolved spec."""
    from fedcore.report.summary import run_spec

    found = run_spec(target)
    if found is None:
        return None
    spec_file, spec = found
    fingerprints = ((spec.get("ledger") or {}).get("settings") or {}).get("trusted_fingerprints") or {}
    return TrustAnchor.from_fingerprints(fingerprints, f"{spec_file}: ledger.settings.trusted_fingerprints") if fingerprints else None


def _default_anchor(ledger: Path) -> TrustAnchor:
    for candidate in (ledger.parent.parent / "keys" / PUBLIC_KEYS_FILE, ledger.parent / PUBLIC_KEYS_FILE):
        if candidate.is_file():
            return TrustAnchor.load(candidate)
    raise DataError("no expected keys", where=str(ledger), hint=f"pass --keys {PUBLIC_KEYS_FILE} (the trust anchor you hold)")


def verify_target(target: Path, keys: Path | None, head: str | None, workers: int | None = None) -> LedgerVerification:
    """Verify every ledger under ``target``; the first failing one is reported."""
    files = ledger_files(target)
    parsed_head = None
    if head is not None:
        try:
            parsed_head = parse_head(head)
        except ValueError:
            raise DataError(f"bad head '{head}'", where="--head", hint="write SEQ:HASH, e.g. 12:9f86d0...(64 hex digits)") from None
        if len(files) > 1:
            raise DataError(f"{target} holds {len(files)} ledgers; a head names one", where="--head", hint="pass the ledger file the head belongs to")
    anchor = TrustAnchor.load(keys) if keys is not None else _spec_anchor(target)
    total = 0
    notes = []
    for path in files:
        used = anchor or _default_anchor(path)
        result = verify_file(path, used, parsed_head, workers)
        total += result.entries
        if not result.ok:
            return LedgerVerification(False, total, result.first_bad_sequence, result.message)
        notes.append(used.source)
    message = f"{len(files)} ledger(s), expected keys from {', '.join(sorted(set(notes)))}"
    if keys is None:
        message += " (found next to the ledger: pass --keys with your own copy for an independent check)" if anchor is None else ""
    if head is None:
        message += "; no --head given, so only the signed head kept next to the ledger was checked"
    return LedgerVerification(True, total, None, message)
