"""Measurement only (``benchmarks/deployment.py --trace-http``): every HTTP request a Flower process makes, with its bytes.

Python imports ``sitecustomize`` at start from ``PYTHONPATH``; the benchmark puts this folder there for the
Flower processes it starts and sets ``FEDCORE_HTTP_TRACE`` to a folder. Each request over httpx (httpcore's
HTTP/1.1 connection) then appends a JSON line to ``<folder>/<pid>.jsonl``: when it ended, its path and port,
and the plaintext bytes written and read on its connection (headers and bodies, before TLS), so that bytes
per Flower path can be counted with TLS on. Without ``FEDCORE_HTTP_TRACE`` it does nothing.
"""

import json
import os
import threading
import time

FOLDER = os.environ.get("FEDCORE_HTTP_TRACE")

if FOLDER:
    import httpcore._backends.sync as _backend
    import httpcore._sync.http11 as _http11

    _current = threading.local()  # [written, read] of the request this thread is making
    _lock = threading.Lock()
    _write, _read, _handle = _backend.SyncStream.write, _backend.SyncStream.read, _http11.HTTP11Connection.handle_request

    def _count(index: int, n: int) -> None:
        counts = getattr(_current, "counts", None)
        if counts is not None:
            counts[index] += n

    def write(self, buffer, timeout=None):  # type: ignore[no-untyped-def]
        _count(0, len(buffer))
        return _write(self, buffer, timeout)

    def read(self, max_bytes, timeout=None):  # type: ignore[no-untyped-def]
        data = _read(self, max_bytes, timeout)
        _count(1, len(data))
        return data

    def handle_request(self, request):  # type: ignore[no-untyped-def]
        counts = _current.counts = [0, 0]
        response = _handle(self, request)
        close = response.stream.close

        def closed() -> None:  # the body has been read: the request is over
            close()
            line = {"t": time.time(), "path": request.url.target.decode(), "port": request.url.port,
                    "up": counts[0], "down": counts[1]}
            with _lock, open(os.path.join(FOLDER, f"{os.getpid()}.jsonl"), "a") as handle:
                handle.write(json.dumps(line) + "\n")
            _current.counts = None

        response.stream.close = closed
        return response

    _backend.SyncStream.write, _backend.SyncStream.read = write, read
    _http11.HTTP11Connection.handle_request = handle_request
