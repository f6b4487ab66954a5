"""Re-checking a ``sqlite-chain`` ledger from its file, the expected keys and a signed head.

The whole table is read in one scan of its B-tree, row by row, with no range or
index lookup, so a row that a corrupted page or a rewritten row id hides from an
ordered query is still read (or the read fails). Per row, at position ``i`` of the
scan: every column has its type, its sequence number is exactly ``i`` (so the
sequence numbers are 0..n-1 with no gap or duplicate), its canonical bytes hash to
the stored hash, it links to row ``i-1``, its writer is a participant of the
header and its signature -- in canonical base64 -- verifies with the writer's
*expected* key. ``count(*)`` must equal the rows read. Entry 0 is the header:
every key it lists must match the trust anchor.

A head ``SEQ:HASH`` names an entry that must still be on the chain (else the tail
was truncated or rewritten). Heads checked: the one given with ``--head``; by
default the run's final head from ``summary.json`` and the newest in
``heads.jsonl``, each only if the server's expected key signed it, and each must
name the last entry (nothing appended after the run ended). Without any, the
result says "no head checked".

Any byte SQLite cannot read, any column of the wrong type, any undecodable text
is a failed verification ("unreadable ledger") naming the first entry it could
not read, never an internal error (``benchmarks/ledger_fuzz.py`` flips bytes at
random to show it).

Signature checks dominate (tens of microseconds each), so above
:data:`PARALLEL_THRESHOLD` entries they run in a process pool on every core.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import urllib.parse
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
SUMMARY_FILE = "summary.json"
#: below this many entries a process pool costs more than it saves
PARALLEL_THRESHOLD = 4000
COLUMNS = "seq, round, kind, writer, payload_sha256, metadata, prev_hash, time_ns, entry_hash, signature"
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq            INTEGER PRIMARY KEY,
    round          INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    writer         TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    metadata       TEXT NOT NULL,
    prev_hash      TEXT NOT NULL,
    time_ns        INTEGER NOT NULL,
    entry_hash     TEXT NOT NULL,
    signature      TEXT NOT NULL
);
"""
#: what sqlite_master must hold: the one table, exactly as SCHEMA created it
_MASTER = [(b"table", b"entries", b"entries", SCHEMA.strip().rstrip(";").replace("IF NOT EXISTS ", "").encode())]
#: the Python type of each column, in COLUMNS order
_COLUMN_TYPES = (int, int, str, str, str, str, str, int, str, str)


@dataclass(frozen=True)
class Problem:
    position: int
    message: str


@dataclass(frozen=True)
class SignedHead:
    """A head to check: where it came from, and whether it must name the chain's last entry."""

    source: str
    sequence: int
    entry_hash: str
    final: bool


def _connect_readonly(path: Path) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    return sqlite3.connect(uri, uri=True)


def _entry_of(row: tuple[Any, ...]) -> Entry | None:
    """The row as an :class:`Entry`, or None when a column has the wrong type."""
    if len(row) != len(_COLUMN_TYPES) or any(type(v) is not t for v, t in zip(row, _COLUMN_TYPES)):
        return None
    return Entry(*row)


def read_entries(path: Path) -> tuple[list[Entry], Problem | None]:
    """Every row in one table scan, checked for types and ``seq == position``; stops at the first problem."""
    entries: list[Entry] = []
    try:
        conn = _connect_readonly(path)
    except sqlite3.Error as exc:
        return entries, Problem(0, f"unreadable ledger ({exc})")
    try:
        conn.text_factory = bytes
        master = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
        conn.text_factory = str
        if master != _MASTER:
            return entries, Problem(0, "unreadable ledger: the table's schema is not sqlite-chain's (edited)")
        cursor = conn.execute(f"SELECT {COLUMNS} FROM entries")
        while True:
            row = cursor.fetchone()
            if row is None:
                break
            position = len(entries)
            entry = _entry_of(row)
            if entry is None:
                return entries, Problem(position, "a field has the wrong type (edited or corrupt)")
            if entry.seq != position:
                return entries, Problem(
                    position, f"expected sequence {position}, found {entry.seq}: an entry was deleted, inserted or reordered"
                )
            entries.append(entry)
        (count,) = conn.execute("SELECT count(*) FROM entries").fetchone()
        if count != len(entries):
            return entries, Problem(len(entries), f"the table holds {count} rows but a scan reads {len(entries)} (corrupt)")
    except (sqlite3.Error, UnicodeDecodeError, OverflowError, ValueError) as exc:
        return entries, Problem(len(entries), f"unreadable ledger ({type(exc).__name__}: {exc})")
    finally:
        conn.close()
    return entries, None


def _check_chain(entries: list[Entry], ledger_id: str, keys: dict[str, str]) -> tuple[list[bytes], Problem | None]:
    """Hashes, links and writers of every entry, in order; (recomputed canonical bytes, first problem)."""
    canonicals: list[bytes] = []
    prev = GENESIS_PREV
    for position, entry in enumerate(entries):
        try:
            canonical = entry.canonical_bytes(ledger_id)
        except (ValueError, TypeError):
            return canonicals, Problem(position, "a field has the wrong type (edited)")
        computed = entry_hash(canonical)
        if computed != entry.entry_hash:
            return canonicals, Problem(position, "content does not match its stored hash (edited)")
        if entry.prev_hash != prev:
            return canonicals, Problem(position, f"does not link to entry {position - 1} (inserted, deleted or reordered)")
        if entry.writer not in keys:
            return canonicals, Problem(position, f"writer '{entry.writer}' has no expected key")
        canonicals.append(canonical)
        prev = computed
    return canonicals, None


def _signature_bytes(text: str) -> bytes | None:
    """The signature, only when ``text`` is its canonical base64 (any other spelling is an edit)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None
    return raw if base64.b64encode(raw).decode() == text else None


#: rows shared with forked workers (copy-on-write), set just before a pool starts
_SHARED: tuple[list[Entry], list[bytes]] = ([], [])


def check_signatures(
    keys_pem: dict[str, str], start: int, end: int, rows: tuple[list[Entry], list[bytes]] | None = None
) -> Problem | None:
    """The first entry in ``[start, end)`` whose signature does not verify with its writer's expected key."""
    entries, canonicals = rows if rows is not None else _SHARED
    keys = {name: load_public_pem(pem) for name, pem in keys_pem.items()}
    offset = start if rows is None else 0
    for position in range(start, end):
        entry = entries[position - offset]
        signature = _signature_bytes(entry.signature)
        if signature is None:
            return Problem(position, "signature is not canonical base64 (edited)")
        if not verify_signature(keys[entry.writer], signature, canonicals[position - offset]):
            return Problem(position, f"signature does not verify with {entry.writer}'s expected key")
    return None


def _first_bad_signature(entries: list[Entry], canonicals: list[bytes], keys: dict[str, str], workers: int | None) -> Problem | None:
    global _SHARED
    spans = _plan_chunks(len(entries), workers)
    if len(spans) == 1:
        return check_signatures(keys, 0, len(entries), (entries, canonicals))
    context = _context()
    forked = context.get_start_method() == "fork"
    if forked:
        _SHARED = (entries, canonicals)
    try:
        with ProcessPoolExecutor(max_workers=_workers(workers), mp_context=context) as pool:
            futures = [
                pool.submit(check_signatures, keys, a, b, None if forked else (entries[a:b], canonicals[a:b]))
                for a, b in spans
            ]
            problems = [p for p in (f.result() for f in futures) if p is not None]
    finally:
        _SHARED = ([], [])
    return min(problems, key=lambda p: p.position) if problems else None


def _header_keys(genesis: Entry, anchor: TrustAnchor) -> tuple[str, dict[str, str], Problem | None]:
    """The ledger id and the verification keys from entry 0, checked against the trust anchor."""
    try:
        header = json.loads(genesis.metadata_json)
        ledger_id = str(header["ledger_id"])
        participants = {str(k): dict(v or {}) for k, v in dict(header["participants"]).items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return "", {}, Problem(0, "header (entry 0) is unreadable")
    if genesis.seq != 0 or genesis.kind != "genesis" or genesis.writer != "server":
        return ledger_id, {}, Problem(0, "entry 0 is not the server's genesis header")
    try:
        header_digest = hashlib.sha256(canonical_json(header)).hexdigest()
    except (ValueError, TypeError, RecursionError):
        header_digest = ""
    if header_digest != genesis.payload_sha256:
        return ledger_id, {}, Problem(0, "header does not match its digest (edited)")
    keys: dict[str, str] = {}
    for name, info in sorted(participants.items()):
        expected = anchor.expected_fingerprint(name)
        if expected is None:
            return ledger_id, {}, Problem(0, f"no expected key for participant '{name}' in {anchor.source}")
        pem = info.get("public_key_pem")
        try:
            listed_key = fingerprint(load_public_pem(pem)) if pem is not None else None
        except (ValueError, TypeError, AttributeError):
            return ledger_id, {}, Problem(0, f"header key of '{name}' is unreadable (edited)")
        if info.get("fingerprint") != expected or (listed_key is not None and listed_key != expected):
            return ledger_id, {}, Problem(0, f"header key of '{name}' is not the expected key (substituted)")
        anchor_key = anchor.keys.get(name)
        if anchor_key is not None:
            keys[name] = public_pem(anchor_key)
        elif pem is not None:
            keys[name] = str(pem)
    return ledger_id, keys, None


def verify_file(
    path: Path, anchor: TrustAnchor, head: tuple[int, str] | None, workers: int | None = None
) -> LedgerVerification:
    """Verify one ledger file. A missing file is a :class:`DataError`; any unreadable byte a failed result."""
    if not path.is_file():
        raise DataError("ledger file not found", where=str(path), hint=f"pass a {LEDGER_FILE} or a run directory")
    entries, read_problem = read_entries(path)
    problems = [read_problem] if read_problem is not None else []
    heads: list[SignedHead] = []
    if not entries and not problems:
        problems.append(Problem(0, "the ledger is empty"))
    elif entries:
        # The rows read before any unreadable one are checked too: the first bad entry is reported.
        ledger_id, keys, header_problem = _header_keys(entries[0], anchor)
        if header_problem is not None:
            problems.append(header_problem)
        else:
            canonicals, chain_problem = _check_chain(entries, ledger_id, keys)
            # Signatures up to the first chain problem: the reported entry is the first bad one either way.
            bad_signature = _first_bad_signature(entries[: len(canonicals)], canonicals, keys, workers)
            problems += [p for p in (chain_problem, bad_signature) if p is not None]
            if read_problem is None:
                heads = _heads(path, ledger_id, keys, head)
                for signed in heads:
                    problems += _check_head(entries, signed)
    if problems:
        return _failed(path, entries, min(problems, key=lambda p: p.position))
    if heads:
        note = "head checked: " + "; ".join(f"{h.source} ({h.sequence})" for h in heads)
    else:
        note = "no head checked: a truncated tail would go unnoticed (pass --head SEQ:HASH)"
    return LedgerVerification(True, len(entries), None, note)


def _failed(path: Path, entries: list[Entry], problem: Problem) -> LedgerVerification:
    return LedgerVerification(False, len(entries), problem.position, f"{path}: {problem.message}")


def _check_head(entries: list[Entry], head: SignedHead) -> list[Problem]:
    n = len(entries)
    if head.sequence < 0:
        return [Problem(n - 1, f"the newest entry cannot be vouched for: {head.source}")]
    if head.sequence >= n:
        return [Problem(n, f"truncated: {head.source} names entry {head.sequence} but the chain ends at {n - 1}")]
    if entries[head.sequence].entry_hash != head.entry_hash:
        return [Problem(head.sequence, f"entry {head.sequence} is not the one {head.source} names (rewritten)")]
    if head.final and head.sequence != n - 1:
        return [Problem(head.sequence + 1, f"entries after the run's final head in {head.source} (appended later)")]
    return []


def _heads(path: Path, ledger_id: str, keys: dict[str, str], given: tuple[int, str] | None) -> list[SignedHead]:
    """The heads to check: ``--head``, then the run's signed heads (summary.json, heads.jsonl)."""
    heads = [SignedHead("--head", given[0], given[1], final=False)] if given is not None else []
    server = keys.get("server")
    for source, document in _kept_heads(path, ledger_id):
        heads.append(_signed_head(source, document, ledger_id, server))
    return heads


def _signed_head(source: str, document: Any, ledger_id: str, server_pem: str | None) -> SignedHead:
    """A head kept with the run, if the server's expected key signed it (else one that names nothing)."""
    try:
        sequence, digest = int(document["sequence"]), str(document["entry_hash"])
        signature = _signature_bytes(str(document["signature"]))
        valid = (
            server_pem is not None
            and signature is not None
            and sequence >= 0
            and verify_signature(load_public_pem(server_pem), signature, head_message(ledger_id, sequence, digest))
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        valid = False
    if not valid:
        return SignedHead(f"{source} (not signed by the server's expected key)", -1, "", final=False)
    return SignedHead(source, sequence, digest, final=True)


def _kept_heads(path: Path, ledger_id: str) -> list[tuple[str, Any]]:
    """(source, head document) of the run's final head in summary.json and the newest line of heads.jsonl."""
    found: list[tuple[str, Any]] = []
    summary = _summary_head(path, ledger_id)
    if summary is not None:
        found.append(summary)
    heads = path.parent / HEADS_FILE
    if heads.is_file():
        try:
            lines = [line for line in heads.read_text(encoding="utf-8").splitlines() if line.strip()]
            newest: Any = json.loads(lines[-1]) if lines else None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            newest = {}
        if newest is not None:
            found.append((str(heads), newest))
    return found


def _summary_head(path: Path, ledger_id: str) -> tuple[str, Any] | None:
    """The final signed head this ledger's run recorded in the run directory's summary.json."""
    # The run directory of a sqlite-chain ledger: RUN/ledger/<arm>-r<repeat>/ledger.sqlite.
    for candidate in path.resolve().parents[2:3]:
        summary = candidate / SUMMARY_FILE
        if not summary.is_file():
            continue
        try:
            document = json.loads(summary.read_text(encoding="utf-8"))
            runs = [run for arm in document["arms"] for run in arm["federated"]["runs"]]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
            return (str(summary), {})
        for run in runs:
            ledger = run.get("ledger") if isinstance(run, dict) else None
            if isinstance(ledger, dict) and ledger.get("ledger_id") == ledger_id and "head_signature" in ledger:
                head = str(ledger.get("head", ""))
                sequence, _, digest = head.partition(":")
                return (str(summary), {"sequence": sequence, "entry_hash": digest, "signature": ledger["head_signature"]})
        return None
    return None


def _plan_chunks(n: int, workers: int | None) -> list[tuple[int, int]]:
    if n < PARALLEL_THRESHOLD or _workers(workers) <= 1:
        return [(0, n)]
    parts = _workers(workers) * 4
    size = -(-n // parts)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _workers(workers: int | None) -> int:
    return max(1, workers or len(os.sched_getaffinity(0)))


def _context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds and shares the rows; verification runs no threads of its own.
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
    for candidate in (ledger.parent / PUBLIC_KEYS_FILE, ledger.parent.parent / "keys" / PUBLIC_KEYS_FILE):
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
    sources, heads = [], []
    for path in files:
        used = anchor or _default_anchor(path)
        result = verify_file(path, used, parsed_head, workers)
        total += result.entries
        if not result.ok:
            return LedgerVerification(False, total, result.first_bad_sequence, result.message)
        sources.append(used.source)
        heads.append(result.message if len(files) == 1 else f"{path.parent.name}: {result.message}")
    message = f"{len(files)} ledger(s), expected keys from {', '.join(sorted(set(sources)))}"
    if keys is None and anchor is None:
        message += " (found next to the ledger: pass --keys with your own copy for an independent check)"
    return LedgerVerification(True, total, None, message + "; " + "; ".join(heads))


def _author(entry: Entry) -> str:
    """Whose payload an entry commits to: its writer, or for a deployed site's update (which the
    coordinator appends with the site's signature in its metadata) the site named there."""
    if entry.kind == "site-update" and entry.writer == "server":
        try:
            site = json.loads(entry.metadata_json).get("site")
        except (ValueError, AttributeError):
            site = None
        if isinstance(site, str):
            return site
    return entry.writer


def verify_openings(target: Path, folder: Path) -> tuple[int, str | None]:
    """Check every opening under ``folder`` against the ledgers of ``target`` (verify those first).

    Returns (openings that open a commitment on their ledger, the first problem or None).
    A folder without openings, or a malformed openings file, is a :class:`DataError`.
    """
    from fedcore.commitments import OPENINGS_FILE, openings_under

    ledgers = {path.parent.name: path for path in ledger_files(target)}
    hint = "pass a party's own folder: RUN/sites/<site> for a site, RUN/openings for the coordinator"
    try:
        found = list(openings_under(folder))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"unreadable openings ({exc})", where=str(folder), hint=hint) from None
    if not found:
        raise DataError(f"no {OPENINGS_FILE} under this folder", where=str(folder), hint=hint)
    count = 0
    for name, where, openings in found:
        path = ledgers.get(name)
        if path is None:
            return count, f"{where}: no ledger '{name}' under {target}"
        entries, problem = read_entries(path)
        if problem is not None:
            return count, f"{path}: {problem.message}"
        committed = {(e.kind, e.round, _author(e), e.payload_sha256) for e in entries}
        for opening in openings:
            reason = opening.check(where)
            if reason is None and (opening.kind, opening.round, opening.writer, opening.commitment) not in committed:
                reason = "no entry of the ledger holds this commitment"
            if reason is not None:
                return count, f"{where / OPENINGS_FILE}: {opening.kind} of round {opening.round} by {opening.writer}: {reason}"
            count += 1
    return count, None
