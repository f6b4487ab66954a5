"""Flip random bytes of a sqlite-chain ledger and count what `fedcore ledger verify` makes of them.

    .venv/bin/python benchmarks/ledger_fuzz.py [--flips 1000] [--seed 0]

Prints detected / changed / crashed: of the flips that changed the ledger's content
(a plain read gives other rows, or none), how many the verifier reported, and how
many flips made it raise instead of answering. Target: every changed flip detected,
0 crashes. The same check runs with 200 flips in CI (tests/test_ledger_fuzz.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ledger-fuzz-bench-") as scratch:
        os.environ.setdefault("FEDCORE_KEYS_DIR", str(Path(scratch) / "keys"))
        from fedcore.plugins.ledgers.fuzz import fuzz_ledger, main_ledger
        from fedcore.plugins.ledgers.keys import PUBLIC_KEYS_FILE, TrustAnchor

        ledger_dir = main_ledger(Path(scratch) / "run")
        anchor = TrustAnchor.load(ledger_dir / PUBLIC_KEYS_FILE)
        start = time.perf_counter()
        tally = fuzz_ledger(ledger_dir, anchor, args.flips, args.seed)
        seconds = time.perf_counter() - start
    print(f"ledger_fuzz: {tally.line()} ({seconds:.1f} s)")
    print(f"detected / changed / crashed: {tally.detected_changed} / {tally.changed} / {tally.crashed}")
    for example in tally.missed + tally.crashes:
        print("  " + example)
    return 0 if tally.detected_changed == tally.changed and tally.crashed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
