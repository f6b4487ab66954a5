"""sqlite-chain throughput: signed appends/s and verified entries/s, Ed25519 vs ECDSA P-256.

    .venv/bin/python benchmarks/ledger_throughput.py [--entries 100000] [--batch 5]

Targets (2 cores): >= 5,000 signed appends/s and >= 20,000 verified entries/s on
100,000 entries. An append call carries one round's records (``--batch``: three
sites, the aggregate, privacy spent) in one transaction, as the engine does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import timeit
from pathlib import Path

from fedcore.plugins.ledgers.keys import generate_private_key, sign, verify_signature
from fedcore.plugins.ledgers.sqlite_chain import SqliteChainLedger
from fedcore.plugins.ledgers.verify import verify_target
from fedcore.types import LedgerRecord


def primitive_costs(algorithm: str) -> tuple[float, float]:
    key = generate_private_key(algorithm)  # type: ignore[arg-type]
    message = b"x" * 420  # about one entry's canonical bytes
    signature = sign(key, message)
    n = 2000
    sign_us = timeit.timeit(lambda: sign(key, message), number=n) / n * 1e6
    verify_us = timeit.timeit(lambda: verify_signature(key.public_key(), signature, message), number=n) / n * 1e6
    return sign_us, verify_us


def run(algorithm: str, entries: int, batch: int, workdir: Path) -> dict[str, float]:
    ledger = SqliteChainLedger(SqliteChainLedger.Settings(algorithm=algorithm))
    ledger.open(workdir / "ledger" / "main-r0", ["site-0", "site-1", "site-2"])
    writers = ["site-0", "site-1", "site-2", "server", "server"]
    rounds = entries // batch
    start = time.perf_counter()
    for round_ in range(1, rounds + 1):
        ledger.append(
            [
                LedgerRecord(kind="site-update" if i < 3 else "aggregate", round=round_, writer=writers[i % 5],
                             payload_sha256=f"{round_:060d}{i:04d}", metadata={"n_samples": 1000 + i})
                for i in range(batch)
            ]
        )
    append_seconds = time.perf_counter() - start
    summary = ledger.close()
    start = time.perf_counter()
    result = verify_target(workdir, None, summary["head"])
    verify_seconds = time.perf_counter() - start
    assert result.ok, result.message
    return {
        "entries": result.entries,
        "appends_per_s": rounds * batch / append_seconds,
        "verified_per_s": result.entries / verify_seconds,
        "mb": summary["bytes"] / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5)
    args = parser.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f}")
    print(f"{'algorithm':<11} {'sign us':>8} {'verify us':>9} {'entries':>8} {'appends/s':>10} {'verified/s':>11} {'MB':>6}")
    for algorithm in ("ed25519", "ecdsa-p256"):
        sign_us, verify_us = primitive_costs(algorithm)
        with tempfile.TemporaryDirectory() as tmp:
            r = run(algorithm, args.entries, args.batch, Path(tmp))
        print(f"{algorithm:<11} {sign_us:>8.1f} {verify_us:>9.1f} {r['entries']:>8} {r['appends_per_s']:>10.0f} {r['verified_per_s']:>11.0f} {r['mb']:>6.1f}")
    print("targets: appends/s >= 5000, verified/s >= 20000 (2 cores)")


if __name__ == "__main__":
    main()
