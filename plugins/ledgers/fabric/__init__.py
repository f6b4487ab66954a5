"""``fabric``: records the run's digests on a Hyperledger Fabric channel through the Gateway API.

With ``endpoint`` unset, the ledger starts :class:`FakeFabricGateway` in process
(a protocol-faithful fake, no consensus) with a development CA issuing each
participant's identity, and says so in the report. With ``endpoint`` set, it
talks to a real Fabric Gateway peer with the MSP identities given in
``identities`` (see docs/ledger.md for a BFT test network).

Each participant submits its own records, signed with its own identity, one
transaction per writer per append; Fabric checks the signatures, the chaincode
checks that the writer named in an entry is the submitting identity.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Ledger, LedgerVerification
from fedcore.errors import DataError, PluginError, SpecError
from fedcore.types import LedgerHead, LedgerRecord


class FabricIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    msp_id: str
    cert: str = Field(description="PEM certificate file")
    key: str = Field(description="PEM private key file (ECDSA P-256)")


class FabricSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str | None = Field(None, description="Gateway peer host:port; unset runs the in-process FakeFabricGateway")
    channel: str = "fedcore"
    chaincode: str = "fedcore-ledger"
    tls_ca_cert: str | None = Field(None, description="PEM of the CA that issued the peer's TLS certificate")
    tls_server_name: str | None = None
    identities: dict[str, FabricIdentity] = Field(default_factory=dict, description="MSP identity of each participant")
    orderer_type: str = Field("BFT", description="the channel's orderer type, as configured on the network (reported)")
    timeout_seconds: float = Field(30.0, gt=0)


class FabricLedger(Ledger):
    """Hyperledger Fabric channel via the Gateway API (or the in-process FakeFabricGateway)."""

    name: ClassVar[str] = "fabric"
    Settings: ClassVar[type[BaseModel]] = FabricSettings
    description: ClassVar[str] = "Hyperledger Fabric Gateway client (FakeFabricGateway when no endpoint is set)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import fabric_protos  # noqa: F401
            import grpc  # noqa: F401
        except ImportError:
            return "needs the fabric extra: pip install 'fedcore[fabric]' (grpcio, hyperledger-fabric-protos)"
        return None

    def check_spec(self, spec: Any, components: Any) -> None:
        s: FabricSettings = self.settings  # type: ignore[assignment]
        reason = self.unavailable_reason()
        if reason:
            raise PluginError(reason, where="ledger.use")
        if s.endpoint is None:
            from fedcore.plugins.ledgers.fabric.fake_gateway import chaincode_unavailable_reason

            reason = chaincode_unavailable_reason()
            if reason:
                raise PluginError(f"the fake Fabric gateway cannot run: {reason}", where="ledger.settings.endpoint")
        elif not s.identities:
            raise SpecError("a Fabric endpoint needs an MSP identity per participant", where="ledger.settings.identities",
                            hint="give server and each site-<i> {msp_id, cert, key}")

    def open(self, directory: Path, participants: Sequence[str]) -> None:
        from fedcore.plugins.ledgers.fabric.client import GatewayClient
        from fedcore.plugins.ledgers.fabric.fake_gateway import CONSENSUS, start_fake_network
        from fedcore.plugins.ledgers.fabric.protocol import Identity

        s: FabricSettings = self.settings  # type: ignore[assignment]
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        everyone = list(dict.fromkeys(["server", *participants]))
        self._fake = None
        tls_ca = Path(s.tls_ca_cert).read_bytes() if s.tls_ca_cert else None
        if s.endpoint is None:
            self._fake, endpoint, identities, _ = start_fake_network(s.channel, s.chaincode, everyone)
            self.consensus = CONSENSUS
        else:
            endpoint = s.endpoint
            missing = [p for p in everyone if p not in s.identities]
            if missing:
                raise DataError(f"no MSP identity for {', '.join(missing)}", where="ledger.settings.identities")
            identities = {p: Identity.from_files(i.msp_id, i.cert, i.key) for p, i in s.identities.items()}
            self.consensus = f"Hyperledger Fabric, orderer type {s.orderer_type}"
        self.clients = {
            p: GatewayClient(endpoint, identities[p], s.channel, s.chaincode, tls_ca, s.tls_server_name, s.timeout_seconds)
            for p in everyone
        }
        self.run_id = self.directory.name + "-" + str(time.time_ns())
        self.receipts = self.directory / "fabric-receipts.jsonl"
        self._stats = {"transactions": 0, "entries": 0, "seconds": 0.0}
        self._opened = time.perf_counter()
        self._rounds: set[int] = set()
        self._last: tuple[int, str] = (0, "")

    def append(self, records: Sequence[LedgerRecord]) -> LedgerHead:
        by_writer: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_writer.setdefault(r.writer, []).append(
                {"round": r.round, "kind": r.kind, "writer": r.writer, "payloadSha256": r.payload_sha256, "metadata": r.metadata}
            )
            self._rounds.add(r.round)
        with self.receipts.open("a") as out:
            for writer, entries in by_writer.items():
                client = self.clients.get(writer)
                if client is None:
                    raise DataError(f"no Fabric identity for writer '{writer}'", where="ledger.settings.identities")
                committed = client.submit("RecordEntries", self.run_id, json.dumps(entries, sort_keys=True))
                self._stats["transactions"] += 1
                self._stats["entries"] += len(entries)
                self._stats["seconds"] += committed.seconds
                self._last = (committed.block_number, committed.tx_id)
                out.write(json.dumps({"tx_id": committed.tx_id, "block": committed.block_number, "writer": writer, "entries": entries}) + "\n")
        block, tx_id = self._last
        return LedgerHead(sequence=block, entry_hash=tx_id, signer="fabric")

    def read_entries(self, round: int | None = None) -> list[dict[str, Any]]:
        client = self.clients["server"]
        raw = client.evaluate("GetRunEntries", self.run_id) if round is None else client.evaluate("GetEntries", self.run_id, str(round))
        return json.loads(raw)

    def close(self) -> dict[str, Any]:
        if not getattr(self, "clients", None):
            return {}
        stats = self._stats
        stored = len(self.read_entries())
        for client in self.clients.values():
            client.close()
        self.clients = {}
        rejected = len(self._fake.rejections) if self._fake is not None else 0
        if self._fake is not None:
            self._fake.stop()
        wall = max(time.perf_counter() - self._opened, 1e-9)
        transactions = stats["transactions"]
        size = self.receipts.stat().st_size if self.receipts.exists() else 0
        return {
            "ledger": self.name,
            "consensus": self.consensus,
            "signature": "ecdsa-p256 (Fabric MSP identities)",
            "transactions": transactions,
            "entries": stats["entries"],
            "entries_on_chain": stored,
            "rejected_transactions": rejected,
            "mean_transaction_ms": round(1000 * stats["seconds"] / max(transactions, 1), 3),
            "transactions_per_minute": round(60 * transactions / wall, 1),
            # Chain growth is the network's to measure; this is the local receipts file.
            "receipt_bytes": size,
            "receipt_bytes_per_round": round(size / max(1, len(self._rounds - {0})), 1),
            "head": f"{self._last[0]}:{self._last[1]}",
        }

    @classmethod
    def verify(cls, target: Path, keys: Path | None = None, head: str | None = None) -> LedgerVerification:
        raise DataError(
            "a Fabric ledger is verified by its network, not from local files",
            where=str(target),
            hint="query the channel (GetRunEntries) with the peer CLI, or use the sqlite-chain ledger for offline verification",
        )
