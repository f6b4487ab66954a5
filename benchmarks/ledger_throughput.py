"""Ledger throughput: sqlite-chain (default) or a live Fabric network with SmartBFT ordering (--fabric).

    .venv/bin/python benchmarks/ledger_throughput.py [--entries 100000] [--batch 5]
    .venv/bin/python benchmarks/ledger_throughput.py --fabric [--rounds 10] [--repeats 10]

sqlite-chain targets (2 cores): >= 5,000 signed appends/s and >= 20,000 verified
entries/s on 100,000 entries. An append call carries one round's records
(``--batch``: three sites, the aggregate, privacy spent) in one transaction, as
the engine does.

--fabric starts a fresh local network (``fedcore fabric up`` in a temporary
directory: 4 organizations, 4 SmartBFT orderers) and runs the study's workload
(3 sites x rounds x repeats of update digests, one concurrent submitter per site,
each through its own peer) twice: with all four orderers, then with one stopped.
It prints commit latency (median, p95), sustained transactions per second, block
size and chain growth on disk per 10 rounds, then Table II beside the study's.
Targets on loopback: median commit latency <= 0.5 s (the study: 1.2 s) and
>= 500 transactions per minute (10 x the study's 50).
"""

from __future__ import annotations

import argparse
import hashlib
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


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fabric_phase(network, rounds: int, repeats: int, label: str) -> dict[str, float]:
    """One pass of the workload: each site's thread submits its update digest for every round of every repeat."""
    import json
    import statistics
    import threading

    from fedcore.plugins.ledgers.fabric import block_bytes
    from fedcore.plugins.ledgers.fabric.network import connect

    profile = network.profile()
    chains = network.root / "data" / network.orgs[0].peer_name / "ledgersData" / "chains"
    before, network_before = _du(chains), _du(network.root / "data")
    latencies: dict[str, list[float]] = {}
    blocks: set[int] = set()
    errors: list[str] = []
    with connect(profile) as clients:
        def submitter(site: str) -> None:
            mine = latencies.setdefault(site, [])
            try:
                for repeat in range(repeats):
                    for round_ in range(1, rounds + 1):
                        digest = hashlib.sha256(f"{label}/{site}/{repeat}/{round_}".encode()).hexdigest()
                        entry = [{"round": round_, "kind": "site-update", "writer": site, "payloadSha256": digest,
                                  "metadata": {"n_samples": 50000, "bytes": 48000}}]
                        committed = clients[site].submit("RecordEntries", f"bench-{label}-r{repeat}", json.dumps(entry))
                        mine.append(committed.seconds)
                        blocks.add(committed.block_number)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"{site}: {exc}")

        sites = [p for p in clients if p != "server"]
        threads = [threading.Thread(target=submitter, args=(site,)) for site in sites]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        if errors:
            raise SystemExit(f"fabric benchmark ({label}) failed: {errors[0]}")
        sizes = [len(block_bytes(clients["server"], b)) for b in sorted(blocks)]
    time.sleep(1.0)  # let the last block reach the disk of every peer
    all_latencies = sorted(x for site in latencies.values() for x in site)
    transactions = len(all_latencies)
    return {
        "transactions": transactions,
        "median_s": statistics.median(all_latencies),
        "p95_s": all_latencies[min(transactions - 1, int(0.95 * transactions))],
        "tx_per_s": transactions / seconds,
        "tx_per_min": 60 * transactions / seconds,
        "blocks": len(blocks),
        "tx_per_block": transactions / len(blocks),
        "block_kb": statistics.mean(sizes) / 1024,
        "growth_mb_per_10_rounds": (_du(chains) - before) / 1e6 / (rounds * repeats / 10),
        # every copy: 4 peers (blocks, state and indexes) and 4 orderers (blocks, BFT write-ahead log)
        "network_mb_per_10_rounds": (_du(network.root / "data") - network_before) / 1e6 / (rounds * repeats / 10),
    }


def fabric_main(rounds: int, repeats: int, keep: bool) -> None:
    import shutil
    import tempfile

    from fedcore.plugins.ledgers.fabric.network import FABRIC_VERSION, LocalNetwork

    root = Path(tempfile.mkdtemp(prefix="fedcore-fabric-bench-")) / "net"
    network = LocalNetwork(root, sites=3, base_port=37050, keep_layout=False)
    print(f"cores available: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f}")
    try:
        network.up(log=lambda m: print(f"  {m}"))
        results = {"all 4 orderers": fabric_phase(network, rounds, repeats, "all")}
        network.stop_node("orderer.site-2")
        results["3 of 4 (one stopped)"] = fabric_phase(network, rounds, repeats, "one-stopped")
    finally:
        network.down()
        if not keep:
            shutil.rmtree(root.parent, ignore_errors=True)
    print(f"\nFabric {FABRIC_VERSION}, SmartBFT, 4 organizations on loopback; workload: 3 sites x {rounds} rounds x "
          f"{repeats} repeats, one concurrent submitter per site")
    print(f"{'orderers':<22} {'tx':>5} {'median s':>9} {'p95 s':>7} {'tx/s':>6} {'tx/min':>7} {'tx/block':>8} "
          f"{'block KB':>8} {'MB/10 rounds':>12} {'all nodes':>9}")
    for name, r in results.items():
        print(f"{name:<22} {r['transactions']:>5} {r['median_s']:>9.3f} {r['p95_s']:>7.3f} {r['tx_per_s']:>6.1f} "
              f"{r['tx_per_min']:>7.0f} {r['tx_per_block']:>8.2f} {r['block_kb']:>8.1f} {r['growth_mb_per_10_rounds']:>12.3f} {r['network_mb_per_10_rounds']:>9.3f}")
    full, degraded = results["all 4 orderers"], results["3 of 4 (one stopped)"]
    print("\nTable II (specs/paper-fabric.yaml's ledger), measured here beside the study's:")
    print(f"| {'':<36} | {'study':>10} | {'4 orderers':>10} | {'3 of 4':>10} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    rows = [
        ("latency per transaction (median)", "1.2 s", f"{full['median_s']:.3f} s", f"{degraded['median_s']:.3f} s"),
        ("latency per transaction (p95)", "n/a", f"{full['p95_s']:.3f} s", f"{degraded['p95_s']:.3f} s"),
        ("transactions per minute", "50", f"{full['tx_per_min']:.0f}", f"{degraded['tx_per_min']:.0f}"),
        ("transactions", "1,500", str(full["transactions"]), str(degraded["transactions"])),
        ("chain growth per 10 rounds, one peer", "30 MB", f"{full['growth_mb_per_10_rounds']:.2f} MB",
         f"{degraded['growth_mb_per_10_rounds']:.2f} MB"),
        ("same, all 8 nodes' disks", "n/a", f"{full['network_mb_per_10_rounds']:.2f} MB",
         f"{degraded['network_mb_per_10_rounds']:.2f} MB"),
    ]
    for row in rows:
        print(f"| {row[0]:<36} | {row[1]:>10} | {row[2]:>10} | {row[3]:>10} |")
    ok_latency = full["median_s"] <= 0.5
    ok_rate = full["tx_per_min"] >= 500
    print(f"targets: median latency <= 0.5 s: {'met' if ok_latency else 'NOT met'} ({full['median_s'] / 1.2:.2f} x the study's); "
          f">= 500 tx/min: {'met' if ok_rate else 'NOT met'} ({full['tx_per_min'] / 50:.1f} x the study's 50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--fabric", action="store_true", help="measure a live local Fabric network instead")
    parser.add_argument("--rounds", type=int, default=10, help="--fabric: rounds per repeat")
    parser.add_argument("--repeats", type=int, default=10, help="--fabric: repeats")
    parser.add_argument("--keep", action="store_true", help="--fabric: keep the network's directory")
    args = parser.parse_args()
    if args.fabric:
        fabric_main(args.rounds, args.repeats, args.keep)
        return
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
