"""``sqlite-chain``: the embedded default ledger, a single-writer signed hash chain in SQLite.

Every entry holds a digest (never a payload), the previous entry's hash and the
writer's signature over its canonical bytes (:mod:`fedcore.plugins.ledgers.chain`).
One :meth:`append` is one SQLite transaction in WAL mode, so a crash leaves the
ledger as it was before the call. Each append returns a head signed by the
server; the heads are also written to ``heads.jsonl`` and the last one goes
into the run report, so deleting the newest entries is detectable.

This ledger provides no consensus: one process writes it and anyone holding
the expected public keys and a head can check it (:mod:`.verify`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Ledger, LedgerVerification
from fedcore.errors import DataError, SpecError
from fedcore.plugins.ledgers.chain import (
    GENESIS_PREV,
    canonical_bytes,
    canonical_json,
    entry_hash,
    metadata_text,
    head_message,
)
from fedcore.plugins.ledgers.keys import (
    PUBLIC_KEYS_FILE,
    Algorithm,
    KeyRing,
    b64,
    default_keys_dir,
    fingerprint,
    public_pem,
    sign,
    verify_signature,
)
from fedcore.plugins.ledgers.verify import HEADS_FILE, LEDGER_FILE, SCHEMA, verify_openings, verify_target
from fedcore.types import LedgerHead, LedgerRecord

CONSENSUS = "none: single-writer signed hash chain (embedded SQLite, no replication)"


#: record kinds whose writer's signature is checked against the expected key before they are accepted
CHECKED_KINDS = frozenset({"site-update"})


class SqliteChainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # ECDSA P-256 verified faster than Ed25519 with this OpenSSL (benchmarks/ledger_throughput.py) and is Fabric's scheme.
    algorithm: Algorithm = Field("ecdsa-p256", description="signature scheme of new keys: ecdsa-p256 or ed25519")
    keys_dir: str | None = Field(
        None,
        description="directory of participants' private keys (created if missing, outside the run directory); "
        "default: $FEDCORE_KEYS_DIR or ~/.local/share/fedcore/keys, per signature scheme",
    )
    trusted_fingerprints: dict[str, str] = Field(
        default_factory=dict,
        description="expected key fingerprints (sha256:HEX of the DER public key) by participant; the trust anchor",
    )
    synchronous: str = Field("NORMAL", pattern="^(NORMAL|FULL)$", description="SQLite synchronous mode under WAL")


class SqliteChainLedger(Ledger):
    """Append-only SQLite hash chain; every entry signed by its writer's key."""

    name: ClassVar[str] = "sqlite-chain"
    Settings: ClassVar[type[BaseModel]] = SqliteChainSettings
    description: ClassVar[str] = "embedded signed hash chain in SQLite (single writer, no consensus)"
    continues_chain: ClassVar[bool] = True

    def __init__(self, settings: BaseModel | None = None) -> None:
        super().__init__(settings)
        self._conn: sqlite3.Connection | None = None

    def check_spec(self, spec: Any, components: Any) -> None:
        s: SqliteChainSettings = self.settings  # type: ignore[assignment]
        for participant, value in s.trusted_fingerprints.items():
            if not (value.startswith("sha256:") and len(value) == 71):
                raise SpecError(
                    f"fingerprint of '{participant}' is not sha256:<64 hex digits>",
                    where=f"ledger.settings.trusted_fingerprints.{participant}",
                    hint="copy the fingerprint from the run's public-keys.json",
                )

    # ------------------------------------------------------------------ writing

    def open(self, directory: Path, participants: Sequence[str]) -> None:
        s: SqliteChainSettings = self.settings  # type: ignore[assignment]
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        keys_dir = (Path(s.keys_dir).expanduser() if s.keys_dir else default_keys_dir(s.algorithm)).resolve()
        run_dir = directory.resolve().parent.parent
        if keys_dir == run_dir or run_dir in keys_dir.parents:
            raise DataError(
                "private signing keys must not live in the run directory (anyone holding it could sign entries)",
                where="ledger.settings.keys_dir",
                hint=f"use a directory outside {run_dir}, or leave keys_dir unset for {default_keys_dir(s.algorithm)}",
            )
        self.keyring = KeyRing(keys_dir, s.algorithm)
        participants = list(dict.fromkeys(["server", *participants]))
        self.keyring.ensure(participants)
        self.keyring.write_anchor(directory / PUBLIC_KEYS_FILE, participants)
        # The expected keys: trusted fingerprints when the spec gives them, else the keys just made.
        self._expected = {
            p: s.trusted_fingerprints.get(p, fingerprint(self.keyring.public(p))) for p in participants
        }
        self.path = directory / LEDGER_FILE
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={s.synchronous}")
        conn.executescript(SCHEMA)
        self._conn = conn
        self._stats = {"transactions": 0, "entries": 0, "append_seconds": 0.0, "rejected": 0}
        self._opened = time.perf_counter()
        self._rounds: set[int] = set()
        self._bytes_after_first: int | None = None
        self._head: LedgerHead | None = None
        last = conn.execute("SELECT seq, entry_hash, metadata FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None:
            self.ledger_id = uuid.uuid4().hex
            self._next_seq, self._last_hash = 0, GENESIS_PREV
            self._write_genesis(participants)
        else:
            genesis = conn.execute("SELECT metadata FROM entries WHERE seq = 0").fetchone()
            header = json.loads(genesis[0]) if genesis else {}
            self.ledger_id = header.get("ledger_id", "")
            known = set(header.get("participants", {}))
            if not set(participants) <= known:
                raise DataError(
                    f"ledger was created for {sorted(known)}, not {sorted(participants)}",
                    where=str(self.path),
                    hint="write to a new ledger directory",
                )
            self._next_seq, self._last_hash = int(last[0]) + 1, str(last[1])

    def _write_genesis(self, participants: list[str]) -> None:
        header: dict[str, Any] = {
            "ledger_id": self.ledger_id,
            "consensus": CONSENSUS,
            "participants": {},
        }
        for p in participants:
            public = self.keyring.public(p)
            own = fingerprint(public)
            header["participants"][p] = {
                "fingerprint": self._expected[p],
                # A key that does not match the trust anchor is not published: its entries get rejected.
                "public_key_pem": public_pem(public) if own == self._expected[p] else None,
            }
        genesis = LedgerRecord(
            kind="spec", round=0, writer="server", payload_sha256=hashlib.sha256(canonical_json(header)).hexdigest(), metadata=header
        )
        self._append([("genesis", genesis)])

    def append(self, records: Sequence[LedgerRecord]) -> LedgerHead:
        if self._conn is None:
            raise RuntimeError("ledger is not open")
        return self._append([(record.kind, record) for record in records])

    def _append(self, items: Sequence[tuple[str, LedgerRecord]]) -> LedgerHead:
        """Sign ``(stored kind, record)`` pairs, chain them and commit them in one transaction."""
        assert self._conn is not None
        start = time.perf_counter()
        seq, prev = self._next_seq, self._last_hash
        rows = []
        for kind, record in items:
            writer = record.writer
            fields: dict[str, Any] = dict(
                ledger_id=self.ledger_id, seq=seq, round=record.round, kind=kind, writer=writer,
                payload_sha256=record.payload_sha256, metadata_json=metadata_text(record.metadata),
                prev_hash=prev, time_ns=time.time_ns(),
            )
            canonical = canonical_bytes(**fields)  # type: ignore[arg-type]
            signature = sign(self.keyring.private(writer), canonical)
            if kind in CHECKED_KINDS and not self._signed_by_expected_key(writer, signature, canonical):
                # Rejected, and the rejection itself goes on the ledger, signed by the server.
                self._stats["rejected"] += 1
                fields.update(
                    kind=f"{kind}-rejected",
                    writer="server",
                    metadata_json=metadata_text(
                        {**record.metadata, "claimed_writer": writer, "reason": "signature does not verify with the expected key"}
                    ),
                )
                canonical = canonical_bytes(**fields)  # type: ignore[arg-type]
                signature = sign(self.keyring.private("server"), canonical)
            digest = entry_hash(canonical)
            rows.append(
                (seq, record.round, fields["kind"], fields["writer"], record.payload_sha256,
                 fields["metadata_json"],
                 prev, fields["time_ns"], digest, b64(signature))
            )
            self._rounds.add(record.round)
            seq, prev = seq + 1, digest
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._next_seq, self._last_hash = seq, prev
        head = self._signed_head(seq - 1, prev)
        self._head = head
        self._stats["transactions"] += 1
        self._stats["entries"] += len(rows)
        self._stats["append_seconds"] += time.perf_counter() - start
        if self._bytes_after_first is None:
            self._bytes_after_first = self._logical_bytes()
        return head

    def _signed_by_expected_key(self, writer: str, signature: bytes, message: bytes) -> bool:
        public = self.keyring.public(writer)
        return fingerprint(public) == self._expected.get(writer) and verify_signature(public, signature, message)

    def _signed_head(self, sequence: int, digest: str) -> LedgerHead:
        signature = sign(self.keyring.private("server"), head_message(self.ledger_id, sequence, digest))
        head = LedgerHead(sequence=sequence, entry_hash=digest, signature=b64(signature), signer="server")
        with open(self.directory / HEADS_FILE, "a") as handle:
            handle.write(head.model_dump_json() + "\n")
        return head

    def _logical_bytes(self) -> int:
        assert self._conn is not None
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    def close(self) -> dict[str, Any]:
        if self._conn is None:
            return {}
        conn = self._conn
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = self._logical_bytes()
        conn.close()
        self._conn = None
        stats = self._stats
        wall = max(time.perf_counter() - self._opened, 1e-9)
        rounds = max(1, len(self._rounds - {0}))
        transactions = stats["transactions"]
        return {
            "ledger": self.name,
            "consensus": CONSENSUS,
            "signature": self.keyring.algorithm,
            "transactions": transactions,
            "entries": stats["entries"],
            "rejected_updates": stats["rejected"],
            "mean_transaction_ms": round(1000 * stats["append_seconds"] / max(transactions, 1), 3),
            "transactions_per_minute": round(60 * transactions / wall, 1),
            "entries_per_second_capacity": round(stats["entries"] / max(stats["append_seconds"], 1e-9), 1),
            "bytes": size,
            "bytes_per_round": round((size - (self._bytes_after_first or 0)) / rounds, 1),
            "head": f"{self._next_seq - 1}:{self._last_hash}",
            # The head signed by the server: what `fedcore ledger verify` checks by default.
            **({"head_signature": self._head.signature} if self._head is not None else {}),
            "ledger_id": self.ledger_id,
            "keys_dir": str(self.keyring.directory),
            "file": str(self.path),
        }

    # ---------------------------------------------------------------- checking

    @classmethod
    def verify(cls, target: Path, keys: Path | None = None, head: str | None = None) -> LedgerVerification:
        return verify_target(Path(target), keys, head)

    @classmethod
    def verify_openings(cls, target: Path, folder: Path) -> tuple[int, str | None]:
        """Openings under ``folder`` checked against ``target``'s ledgers (see :mod:`fedcore.commitments`)."""
        return verify_openings(Path(target), Path(folder))
