"""The canonical bytes of a ledger entry, its hash, and the signed head (see docs/ledger.md).

An entry's canonical bytes are the UTF-8 JSON of the object::

    {"format": "fedcore-ledger-entry-v1", "kind": ..., "ledger_id": ..., "metadata": {...},
     "payload_sha256": ..., "prev_hash": ..., "round": ..., "seq": ..., "time_ns": ..., "writer": ...}

with keys sorted, no whitespace (``separators=(",", ":")``), non-ASCII kept as
UTF-8 and only finite numbers. ``entry_hash = SHA-256(canonical bytes)`` (hex);
the writer signs the canonical bytes; the next entry's ``prev_hash`` is this
entry's hash; the first entry (sequence 0, kind ``genesis``, written by the
server) has ``prev_hash`` of 64 zeros and holds the ledger's header.
"""

from __future__ import annotations

import hashlib
import json
import math
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from dataclasses import dataclass
from typing import Any

ENTRY_FORMAT = "fedcore-ledger-entry-v1"
HEAD_FORMAT = "fedcore-ledger-head-v1"
GENESIS_PREV = "0" * 64


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; NaN and infinities are refused (JSON has none)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def metadata_text(metadata: dict[str, Any]) -> str:
    """The canonical JSON text of an entry's metadata (non-finite floats as strings)."""
    return canonical_json(finite_metadata(metadata)).decode()


def finite_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as canonical JSON allows: non-finite floats become strings (``"nan"``, ``"inf"``)."""

    def fix(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        if isinstance(value, dict):
            return {str(k): fix(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [fix(v) for v in value]
        return value

    return fix(json.loads(json.dumps(metadata, default=str)))


@dataclass(frozen=True)
class Entry:
    """One ledger entry as stored (``entry_hash`` and ``signature`` as written, not recomputed)."""

    seq: int
    round: int
    kind: str
    writer: str
    payload_sha256: str
    metadata_json: str
    prev_hash: str
    time_ns: int
    entry_hash: str
    signature: str

    def canonical_bytes(self, ledger_id: str) -> bytes:
        """Rebuilt from the stored columns byte for byte: any changed byte changes the hash."""
        return canonical_bytes(
            ledger_id=ledger_id,
            seq=self.seq,
            round=self.round,
            kind=self.kind,
            writer=self.writer,
            payload_sha256=self.payload_sha256,
            metadata_json=self.metadata_json,
            prev_hash=self.prev_hash,
            time_ns=self.time_ns,
        )


_ENTRY_TEMPLATE = (
    '{"format":"' + ENTRY_FORMAT + '","kind":%s,"ledger_id":%s,"metadata":%s,"payload_sha256":%s,'
    '"prev_hash":%s,"round":%d,"seq":%d,"time_ns":%d,"writer":%s}'
)


def _string(value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    # The C escaper behind json.dumps(value, ensure_ascii=False), without its per-call setup.
    return encode_basestring(value)


def _integer(value: int) -> int:
    if type(value) is not int:  # noqa: E721 - bool and float must not pass as integers
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def canonical_bytes(
    *,
    ledger_id: str,
    seq: int,
    round: int,
    kind: str,
    writer: str,
    payload_sha256: str,
    metadata_json: str,
    prev_hash: str,
    time_ns: int,
) -> bytes:
    """``canonical_json`` of the entry object, given its metadata already in canonical JSON.

    Formatting the stored metadata text in, instead of parsing and re-serializing
    it, is both faster and stricter: a reformatted metadata text no longer hashes
    the same. ``tests/test_ledger_chain.py`` checks this equals :func:`canonical_json`.
    """
    return (
        _ENTRY_TEMPLATE
        % (
            _string(kind),
            _string(ledger_id),
            metadata_json,
            _string(payload_sha256),
            _string(prev_hash),
            _integer(round),
            _integer(seq),
            _integer(time_ns),
            _string(writer),
        )
    ).encode()


def entry_hash(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


def head_message(ledger_id: str, sequence: int, entry_hash_hex: str) -> bytes:
    """What the server signs to vouch for the ledger's newest entry."""
    return canonical_json({"entry_hash": entry_hash_hex, "format": HEAD_FORMAT, "ledger_id": ledger_id, "seq": sequence})


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` -> (sequence, lowercase hex hash); raises ValueError when malformed."""
    seq_text, sep, hash_text = text.strip().partition(":")
    hash_text = hash_text.lower()
    if not sep or not seq_text.isdigit() or len(hash_text) != 64 or any(c not in "0123456789abcdef" for c in hash_text):
        raise ValueError(text)
    return int(seq_text), hash_text
