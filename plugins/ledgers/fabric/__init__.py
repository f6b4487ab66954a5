"""``fabric``: records the run's digests on a Hyperledger Fabric channel through the Gateway API.

Three ways to reach a network:

- ``network: local`` (or a directory): the network ``fedcore fabric up`` started
  (started here when it is not running): 4 organizations, 4 SmartBFT orderers,
  each participant through its own organization's peer with mutual TLS.
- ``endpoint`` + ``identities``: a consortium's existing network.
- neither: :class:`FakeFabricGateway` in process (a protocol-faithful fake, no
  consensus, for fast tests); its report says "simulated" everywhere.

Each participant submits its own records, signed with its own identity, one
transaction per writer per append; Fabric checks the signatures and the
endorsement policy, the chaincode checks that the writer named in an entry is
the submitting identity. A transaction is recorded as committed (in
``fabric-receipts.jsonl``) only once its peer reports it VALID in a block; one
handed to the orderers whose commit was not seen goes to
``fabric-unconfirmed.jsonl``. The consensus type in the report is read from the
channel's config block.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedcore.components import Ledger, LedgerVerification
from fedcore.errors import DataError, PluginError, RunFailure, SpecError
from fedcore.types import LedgerHead, LedgerRecord

RECEIPTS = "fabric-receipts.jsonl"
UNCONFIRMED = "fabric-unconfirmed.jsonl"
CONNECTION = "fabric-ledger.json"


class FabricIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    msp_id: str
    cert: str = Field(description="PEM certificate file")
    key: str = Field(description="PEM private key file (ECDSA P-256)")
    endpoint: str | None = Field(None, description="this participant's own Gateway peer (default: the ledger's endpoint)")
    tls_client_cert: str | None = Field(None, description="PEM client certificate for peers that require mutual TLS")
    tls_client_key: str | None = Field(None, description="PEM key of tls_client_cert")
    endorsing_organizations: list[str] = Field(
        default_factory=list, description="MSP ids whose peers endorse this participant's transactions (empty: the gateway plans)"
    )


class FabricSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    network: str | None = Field(
        None, description="'local' (the network `fedcore fabric up` runs) or its directory; started when not running"
    )
    endpoint: str | None = Field(None, description="Gateway peer host:port of an existing network")
    channel: str = "fedcore"
    chaincode: str = "fedcore-ledger"
    tls_ca_cert: str | None = Field(None, description="PEM of the CA that issued the peer's TLS certificate")
    tls_server_name: str | None = None
    identities: dict[str, FabricIdentity] = Field(default_factory=dict, description="MSP identity of each participant")
    timeout_seconds: float = Field(30.0, gt=0, description="limit on each gateway call (endorse, submit)")
    commit_timeout_seconds: float = Field(30.0, gt=0, description="how long to wait for a submitted transaction's block")
    on_ordering_failure: Literal["fail", "wait"] = Field(
        "fail", description="when the orderers cannot order (e.g. no BFT quorum): stop the run, or retry"
    )
    wait_seconds: float = Field(600.0, gt=0, description="with on_ordering_failure: wait, how long to keep retrying")


class FabricLedger(Ledger):
    """Hyperledger Fabric channel via the Gateway API (a local SmartBFT network, an existing one, or the fake)."""

    name: ClassVar[str] = "fabric"
    Settings: ClassVar[type[BaseModel]] = FabricSettings
    description: ClassVar[str] = (
        "Hyperledger Fabric Gateway client: the local SmartBFT network (network: local), an existing network "
        "(endpoint), or a simulated in-process gateway (neither)"
    )

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
        if s.network is not None and s.endpoint is not None:
            raise SpecError("set either network or endpoint, not both", where="ledger.settings",
                            hint="network: local for `fedcore fabric up`'s network, endpoint for an existing one")
        if s.network is not None:
            from fedcore.plugins.ledgers.fabric.network import missing_binaries

            missing = missing_binaries()
            profile = _network_profile(s.network)
            if missing and profile is None:
                raise PluginError(f"Fabric binaries missing: {', '.join(missing)}", where="ledger.settings.network",
                                  hint="build them once with `fedcore fabric build`, then `fedcore fabric up`")
        elif s.endpoint is None:
            from fedcore.plugins.ledgers.fabric.fake_gateway import chaincode_unavailable_reason

            reason = chaincode_unavailable_reason()
            if reason:
                raise PluginError(f"the simulated Fabric gateway cannot run: {reason}", where="ledger.settings.endpoint")
        elif not s.identities:
            raise SpecError("a Fabric endpoint needs an MSP identity per participant", where="ledger.settings.identities",
                            hint="give server and each site-<i> {msp_id, cert, key}")

    def open(self, directory: Path, participants: Sequence[str]) -> None:
        s: FabricSettings = self.settings  # type: ignore[assignment]
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        everyone = list(dict.fromkeys(["server", *participants]))
        self._fake = None
        self._network_dir: Path | None = None
        if s.network is not None:
            self.clients, self._network_dir = _local_clients(s, everyone)
        elif s.endpoint is not None:
            self.clients = _endpoint_clients(s, everyone)
        else:
            self.clients = self._fake_clients(s, everyone)
        self.simulated = self._fake is not None
        if self.simulated:
            self.consensus = _simulated_consensus()
        else:
            from fedcore.plugins.ledgers.fabric.client import FabricTransactionError

            try:
                self.consensus = channel_consensus(self.clients["server"])
            except FabricTransactionError as exc:
                raise RunFailure(f"Fabric: cannot read the channel's config through the coordinator's peer: {exc}") from None
        self.run_id = self.directory.name + "-" + str(time.time_ns())
        self.receipts = self.directory / RECEIPTS
        self.unconfirmed = self.directory / UNCONFIRMED
        connection = {"format": "fedcore-fabric-ledger-v1", "run_id": self.run_id, "channel": s.channel,
                      "chaincode": s.chaincode, "simulated": self.simulated,
                      "network": str(self._network_dir) if self._network_dir else None, "endpoint": s.endpoint}
        (self.directory / CONNECTION).write_text(json.dumps(connection, indent=1))
        self._stats = {"transactions": 0, "entries": 0, "seconds": 0.0}
        self._opened = time.perf_counter()
        self._rounds: set[int] = set()
        self._last: tuple[int, str] = (0, "")
        self._blocks: set[int] = set()

    def _fake_clients(self, s: FabricSettings, everyone: list[str]) -> dict[str, Any]:
        from fedcore.plugins.ledgers.fabric.client import GatewayClient
        from fedcore.plugins.ledgers.fabric.fake_gateway import start_fake_network

        self._fake, endpoint, identities, _ = start_fake_network(s.channel, s.chaincode, everyone)
        return {p: GatewayClient(endpoint, identities[p], s.channel, s.chaincode, None, None, s.timeout_seconds)
                for p in everyone}

    def append(self, records: Sequence[LedgerRecord]) -> LedgerHead:
        by_writer: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_writer.setdefault(r.writer, []).append(
                {"round": r.round, "kind": r.kind, "writer": r.writer, "payloadSha256": r.payload_sha256, "metadata": r.metadata}
            )
            self._rounds.add(r.round)
        for writer, entries in by_writer.items():
            client = self.clients.get(writer)
            if client is None:
                raise DataError(f"no Fabric identity for writer '{writer}'", where="ledger.settings.identities")
            committed = self._submit(writer, client, entries)
            self._stats["transactions"] += 1
            self._stats["entries"] += len(entries)
            self._stats["seconds"] += committed.seconds
            self._last = (committed.block_number, committed.tx_id)
            self._blocks.add(committed.block_number)
            _append_line(self.receipts, {"run_id": self.run_id, "tx_id": committed.tx_id, "block": committed.block_number,
                                         "writer": writer, "seconds": round(committed.seconds, 6), "entries": entries})
        block, tx_id = self._last
        return LedgerHead(sequence=block, entry_hash=tx_id, signer="fabric")

    def _submit(self, writer: str, client: Any, entries: list[dict[str, Any]]) -> Any:
        """Submit and wait for the commit; on an ordering failure stop the run (or retry while waiting)."""
        from fedcore.plugins.ledgers.fabric.client import FabricTransactionError

        s: FabricSettings = self.settings  # type: ignore[assignment]
        deadline = time.monotonic() + s.wait_seconds
        while True:
            try:
                return client.submit("RecordEntries", self.run_id, json.dumps(entries, sort_keys=True))
            except FabricTransactionError as exc:
                if exc.tx_id is not None:  # handed to the orderers: it may still be ordered, so not "committed"
                    _append_line(self.unconfirmed, {"run_id": self.run_id, "tx_id": exc.tx_id, "writer": writer,
                                                    "entries": entries, "error": str(exc)})
                ordering = exc.tx_id is not None
                if ordering and s.on_ordering_failure == "wait" and time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                raise RunFailure(self._failure(writer, exc, ordering)) from None

    def _failure(self, writer: str, exc: Exception, ordering: bool) -> str:
        what = "could not be ordered" if ordering else "was refused"
        message = f"Fabric: {writer}'s ledger transaction {what}: {exc}"
        if self._network_dir is not None:
            from fedcore.plugins.ledgers.fabric.network import LocalNetwork

            status = LocalNetwork(self._network_dir).status()
            down = [n for n, node in status["nodes"].items() if n.startswith("orderer.") and not node["running"]]
            message += (f" (orderers running {status['orderers_running']}/{status['orderers']}, SmartBFT quorum "
                        f"{status['quorum']}{'; stopped: ' + ', '.join(down) if down else ''})")
        return message + f"; nothing after the last receipt in {self.receipts} was recorded as committed"

    def read_entries(self, round: int | None = None) -> list[dict[str, Any]]:
        client = self.clients["server"]
        raw = client.evaluate("GetRunEntries", self.run_id) if round is None else client.evaluate("GetEntries", self.run_id, str(round))
        return json.loads(raw)

    def close(self) -> dict[str, Any]:
        if not getattr(self, "clients", None):
            return {}
        stats = self._stats
        stored = len(self.read_entries())
        chain_bytes = 0 if self.simulated else sum(len(block_bytes(self.clients["server"], b)) for b in self._blocks)
        for client in self.clients.values():
            client.close()
        self.clients = {}
        rejected = len(self._fake.rejections) if self._fake is not None else 0
        if self._fake is not None:
            self._fake.stop()
        wall = max(time.perf_counter() - self._opened, 1e-9)
        transactions = stats["transactions"]
        size = self.receipts.stat().st_size if self.receipts.exists() else 0
        rounds = max(1, len(self._rounds - {0}))
        unconfirmed = sum(1 for _ in self.unconfirmed.open()) if self.unconfirmed.exists() else 0
        summary = {
            "ledger": "fabric (simulated: FakeFabricGateway)" if self.simulated else "fabric",
            "consensus": self.consensus,
            "signature": ("ecdsa-p256 (simulated Fabric MSP identities)" if self.simulated
                          else "ecdsa-p256 (Fabric MSP identities, one CA per organization)"),
            "transactions": transactions,
            "entries": stats["entries"],
            "entries_on_chain": stored,
            "unconfirmed_transactions": unconfirmed,
            "rejected_transactions": rejected,
            "mean_transaction_ms": round(1000 * stats["seconds"] / max(transactions, 1), 3),
            "transactions_per_minute": round(60 * transactions / wall, 1),
            "receipt_bytes": size,
            "head": f"{self._last[0]}:{self._last[1]}",
        }
        if not self.simulated:
            # The blocks that hold this run's transactions, as the peer serves them (header, data, BFT signatures).
            summary.update({"blocks": len(self._blocks), "bytes": chain_bytes, "bytes_per_round": round(chain_bytes / rounds, 1)})
        return summary

    @classmethod
    def verify(cls, target: Path, keys: Path | None = None, head: str | None = None) -> LedgerVerification:
        """Re-read every receipt's transaction from the peer (its block, validation code and writes) and the
        chaincode's entries of the run, and match them against the run's own records."""
        from fedcore.plugins.ledgers.fabric.verify import verify_run

        return verify_run(target)


def _append_line(path: Path, obj: dict[str, Any]) -> None:
    with path.open("a") as out:
        out.write(json.dumps(obj, sort_keys=True) + "\n")


def _simulated_consensus() -> str:
    from fedcore.plugins.ledgers.fabric.fake_gateway import CONSENSUS

    return CONSENSUS


def _network_profile(network: str) -> dict[str, Any] | None:
    from fedcore.plugins.ledgers.fabric.network import LocalNetwork, default_network_dir

    return LocalNetwork(default_network_dir() if network == "local" else Path(network)).profile()


def network_dir(network: str) -> Path:
    from fedcore.plugins.ledgers.fabric.network import default_network_dir

    return (default_network_dir() if network == "local" else Path(network)).resolve()


def _local_clients(s: FabricSettings, everyone: list[str]) -> tuple[dict[str, Any], Path]:
    """Clients for the local network, starting it when it does not run."""
    from fedcore.plugins.ledgers.fabric.network import LocalNetwork, connect

    assert s.network is not None
    network = LocalNetwork(network_dir(s.network))
    with network.lock():  # parallel workers of one run: one of them starts the network
        if not network.running():  # a partly stopped network is used as it is: BFT tolerates a stopped orderer
            print(f"fabric ledger: starting the local network in {network.root} (under a minute)", file=sys.stderr)
            network.up(log=lambda _msg: None)
    profile = network.profile()
    assert profile is not None
    known = {org["participant"] for org in profile["organizations"]}
    missing = [p for p in everyone if p not in known]
    if missing:
        raise DataError(f"the local Fabric network has no organization for {', '.join(missing)}",
                        where="ledger.settings.network",
                        hint=f"recreate it with `fedcore fabric down && fedcore fabric up --fresh --sites {len(everyone) - 1}`")
    clients = connect(profile, s.timeout_seconds, s.commit_timeout_seconds)
    return {p: clients[p] for p in everyone}, network.root


def _endpoint_clients(s: FabricSettings, everyone: list[str]) -> dict[str, Any]:
    from fedcore.plugins.ledgers.fabric.client import GatewayClient
    from fedcore.plugins.ledgers.fabric.protocol import Identity

    missing = [p for p in everyone if p not in s.identities]
    if missing:
        raise DataError(f"no MSP identity for {', '.join(missing)}", where="ledger.settings.identities")
    tls_ca = Path(s.tls_ca_cert).read_bytes() if s.tls_ca_cert else None
    clients = {}
    for p in everyone:
        i = s.identities[p]
        clients[p] = GatewayClient(
            i.endpoint or s.endpoint or "", Identity.from_files(i.msp_id, i.cert, i.key), s.channel, s.chaincode, tls_ca,
            s.tls_server_name, s.timeout_seconds,
            tls_client_cert_pem=Path(i.tls_client_cert).read_bytes() if i.tls_client_cert else None,
            tls_client_key_pem=Path(i.tls_client_key).read_bytes() if i.tls_client_key else None,
            endorsing_organizations=tuple(i.endorsing_organizations), commit_timeout=s.commit_timeout_seconds,
        )
    return clients


def block_bytes(client: Any, number: int) -> bytes:
    """Block ``number`` as the peer serves it (system chaincode qscc)."""
    return client.evaluate("GetBlockByNumber", client.channel_name, str(number), chaincode="qscc")


def orderer_config(client: Any) -> tuple[int, Any]:
    """(index, Orderer config group) of the channel's latest config block, found through the last block's metadata."""
    from fabric_protos.common import common_pb2, configtx_pb2, ledger_pb2

    info = ledger_pb2.BlockchainInfo.FromString(client.evaluate("GetChainInfo", client.channel_name, chaincode="qscc"))
    last = common_pb2.Block.FromString(block_bytes(client, info.height - 1))
    signatures = common_pb2.Metadata.FromString(last.metadata.metadata[common_pb2.BlockMetadataIndex.SIGNATURES])
    config_index = common_pb2.OrdererBlockMetadata.FromString(signatures.value).last_config.index
    block = common_pb2.Block.FromString(block_bytes(client, config_index))
    envelope = common_pb2.Envelope.FromString(block.data.data[0])
    config = configtx_pb2.ConfigEnvelope.FromString(common_pb2.Payload.FromString(envelope.payload).data).config
    return config_index, config.channel_group.groups["Orderer"]


def consenters(orderer: Any) -> list[Any]:
    """The BFT consenters (id, MSP id, identity certificate) of an Orderer config group; [] for other orderer types."""
    from fabric_protos.common import configuration_pb2

    if "Orderers" not in orderer.values:
        return []
    return list(configuration_pb2.Orderers.FromString(orderer.values["Orderers"].value).consenter_mapping)


def channel_consensus(client: Any) -> str:
    """The channel's ordering, read from its latest config block (not from a setting)."""
    from fabric_protos.orderer import configuration_pb2

    config_index, orderer = orderer_config(client)
    kind = configuration_pb2.ConsensusType.FromString(orderer.values["ConsensusType"].value).type
    text = f"Hyperledger Fabric, orderer type {kind} (channel config block {config_index})"
    n = len(consenters(orderer))
    if n:
        text += f", {n} consenters, tolerates {(n - 1) // 3} faulty"
    return text
