"""Reference ledgers: ``sqlite-chain`` (embedded signed hash chain, the default) and ``fabric``.

Imports happen inside the hook so that verification worker processes, which
import this package, stay light (the Fabric client pulls in grpc).
"""

from __future__ import annotations

from fedcore import hookimpl
from fedcore.components import Ledger


@hookimpl
def fedcore_ledgers() -> list[type[Ledger]]:
    from fedcore.plugins.ledgers.fabric import FabricLedger
    from fedcore.plugins.ledgers.sqlite_chain import SqliteChainLedger

    return [SqliteChainLedger, FabricLedger]
