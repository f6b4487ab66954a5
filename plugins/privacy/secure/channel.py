"""The server's inbox: authenticated frames over TCP from each party, with an optional capture.

The parties send the server their shares of the sum and nothing else; the server
adds them up (:mod:`.fixed_point`). Each frame is
``u32 header length | header JSON | u64 body length | body | HMAC-SHA256(key, header || body)``
with a per-run key handed to the parties at start, so a stray local process
cannot inject a share. Loopback TCP stands in for the TLS link a deployment
would use between hospitals and the server.

``capture`` records every byte the server reads, per connection, exactly as
received: the audit that checks no individual update ever reached the server
(:mod:`.audit`) works on this record, not on what the code meant to send.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_HEADER = struct.Struct("<I")
_BODY = struct.Struct("<Q")
_TAG_BYTES = 32
_CAPTURE_RECORD = struct.Struct("<II")
#: how often a waiting receiver checks that the parties are alive
POLL_SECONDS = 0.2


class ChannelError(RuntimeError):
    """A peer closed its connection, sent a bad frame, or did not answer in time."""


def encode_frame(key: bytes, header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    tag = hmac.new(key, head + body, hashlib.sha256).digest()
    return _HEADER.pack(len(head)) + head + _BODY.pack(len(body)) + body + tag


def decode_frames(data: bytes, key: bytes | None = None) -> list[tuple[dict[str, Any], bytes]]:
    """Every complete frame in ``data`` (a captured stream); checks tags when ``key`` is given."""
    frames: list[tuple[dict[str, Any], bytes]] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        (head_len,) = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if start + head_len + _BODY.size > len(data):
            break
        head = data[start : start + head_len]
        (body_len,) = _BODY.unpack_from(data, start + head_len)
        body_start = start + head_len + _BODY.size
        end = body_start + body_len + _TAG_BYTES
        if end > len(data):
            break
        body = data[body_start : body_start + body_len]
        if key is not None:
            _check_tag(key, head, body, data[end - _TAG_BYTES : end])
        frames.append((json.loads(head), body))
        pos = end
    return frames


def _check_tag(key: bytes, head: bytes, body: bytes, tag: bytes) -> None:
    if not hmac.compare_digest(hmac.new(key, head + body, hashlib.sha256).digest(), tag):
        raise ChannelError("a frame failed authentication (wrong run key or corrupted data)")


class FrameSender:
    """A party's (or, in the plain control, a site's) connection to the server."""

    def __init__(self, address: tuple[str, int], key: bytes, hello: dict[str, Any], timeout: float) -> None:
        self._key = key
        self._sock = socket.create_connection(address, timeout=timeout)
        self.send(hello)

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self._sock.sendall(encode_frame(self._key, header, body))

    def close(self) -> None:
        self._sock.close()


class FrameReceiver:
    """The server end: accepts ``n_peers`` connections, then one frame per peer per round.

    :param watch: called every :data:`POLL_SECONDS` while waiting; raises to abort
        (the party group's liveness check), so a dead party never leaves the server waiting.
    """

    def __init__(
        self,
        n_peers: int,
        key: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        capture: Path | None = None,
    ) -> None:
        self.n_peers = n_peers
        self._key = key
        self._listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._peers: dict[int, socket.socket] = {}
        self._pending: dict[int, bytes] = {}
        self._capture: BinaryIO | None = capture.open("ab") if capture is not None else None
        self._connection_ids: dict[socket.socket, int] = {}

    def accept(self, id_key: str, deadline: float, watch: Callable[[], None] = lambda: None) -> None:
        """Accept every peer; each introduces itself with a hello frame carrying ``id_key``."""
        while len(self._peers) < self.n_peers:
            watch()
            ready, _, _ = select.select([self._listener], [], [], _wait(deadline))
            if not ready:
                _check_deadline(deadline, f"{len(self._peers)} of {self.n_peers} peers connected to the server")
                continue
            conn, _ = self._listener.accept()
            self._connection_ids[conn] = len(self._connection_ids)
            header, _ = self._read_frame(conn, deadline)
            peer = int(header.get(id_key, -1))
            if header.get("type") != "hello" or not 0 <= peer < self.n_peers or peer in self._peers:
                conn.close()
                raise ChannelError(f"unexpected hello from a peer: {header}")
            self._peers[peer] = conn

    def receive_round(
        self, kind: str, round: int, deadline: float, watch: Callable[[], None] = lambda: None
    ) -> dict[int, tuple[dict[str, Any], bytes]]:
        """One ``kind`` frame of ``round`` from every peer, by peer id."""
        got: dict[int, tuple[dict[str, Any], bytes]] = {}
        while len(got) < self.n_peers:
            watch()
            waiting = {sock: peer for peer, sock in self._peers.items() if peer not in got}
            ready, _, _ = select.select(list(waiting), [], [], _wait(deadline))
            if not ready:
                missing = sorted(waiting.values())
                _check_deadline(deadline, f"round {round}: no {kind} from peer(s) {missing}")
                continue
            for sock in ready:
                header, body = self._read_frame(sock, deadline)
                if header.get("type") != kind or header.get("round") != round:
                    raise ChannelError(f"expected a {kind} of round {round}, got {header}")
                got[waiting[sock]] = (header, body)
        return got

    def _read_frame(self, sock: socket.socket, deadline: float) -> tuple[dict[str, Any], bytes]:
        (head_len,) = _HEADER.unpack(self._read_exact(sock, _HEADER.size, deadline))
        head = self._read_exact(sock, head_len, deadline)
        (body_len,) = _BODY.unpack(self._read_exact(sock, _BODY.size, deadline))
        body = self._read_exact(sock, body_len, deadline)
        _check_tag(self._key, head, body, self._read_exact(sock, _TAG_BYTES, deadline))
        return json.loads(head), body

    def _read_exact(self, sock: socket.socket, size: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = sock.recv(min(remaining, 1 << 20))
            except TimeoutError:
                raise ChannelError("a peer stopped sending in the middle of a frame") from None
            if not chunk:
                raise ChannelError("a peer closed its connection to the server")
            self._record(sock, chunk)
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _record(self, sock: socket.socket, chunk: bytes) -> None:
        if self._capture is not None:
            self._capture.write(_CAPTURE_RECORD.pack(self._connection_ids.get(sock, 0), len(chunk)) + chunk)
            self._capture.flush()

    def close(self) -> None:
        for sock in self._peers.values():
            sock.close()
        self._peers.clear()
        self._listener.close()
        if self._capture is not None:
            self._capture.close()
            self._capture = None


def read_capture(path: Path) -> dict[int, bytes]:
    """Everything a capturing receiver read, as one byte stream per connection."""
    data = path.read_bytes()
    streams: dict[int, list[bytes]] = {}
    pos = 0
    while pos < len(data):
        conn, size = _CAPTURE_RECORD.unpack_from(data, pos)
        pos += _CAPTURE_RECORD.size
        streams.setdefault(conn, []).append(data[pos : pos + size])
        pos += size
    return {conn: b"".join(chunks) for conn, chunks in streams.items()}


def int64_body(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<i8").tobytes()


def int64_from_body(body: bytes) -> np.ndarray:
    return np.frombuffer(body, dtype="<i8").astype(np.int64)


def _wait(deadline: float) -> float:
    return max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))


def _check_deadline(deadline: float, what: str) -> None:
    if time.monotonic() >= deadline:
        raise ChannelError(f"timed out: {what}")
