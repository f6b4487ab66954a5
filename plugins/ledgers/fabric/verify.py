"""``fedcore ledger verify RUN --ledger fabric``: the run's own records against what the peer serves.

For every ledger folder of the run (one per arm and repeat) it reads
``fabric-receipts.jsonl`` (what the run recorded as committed) and checks, from
the channel through the server's peer:

1. each receipt's transaction is in the block the receipt names, marked VALID
   in that block's validation flags, and its write set holds exactly the
   receipt's entries (system chaincode ``qscc``: the committed blocks); the
   block's data hash matches its data and its header carries valid signatures
   of a BFT quorum of the channel's consenters (checked here, against the
   consenters' certificates in the channel config, not taken from the peer);
2. the chaincode's entries of the run (``GetRunEntries``) are exactly the
   receipts' entries, except transactions the run listed in
   ``fabric-unconfirmed.jsonl`` (handed to the orderers when ordering failed;
   reported, not counted as tampering).

Exit 1 names the first receipt line that does not match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcore.components import LedgerVerification
from fedcore.errors import DataError

FIELDS = ("round", "kind", "writer", "payloadSha256", "metadata")


def verify_run(target: Path) -> LedgerVerification:
    from fedcore.plugins.ledgers.fabric.client import FabricTransactionError

    try:
        return _verify(target)
    except FabricTransactionError as exc:
        raise DataError(f"cannot read the channel through the coordinator's peer: {exc}", where=str(target),
                        hint="is the network up? `fedcore fabric status`") from None


def _verify(target: Path) -> LedgerVerification:
    from fedcore.plugins.ledgers.fabric import CONNECTION, RECEIPTS, UNCONFIRMED

    folders = sorted({p.parent for p in Path(target).rglob(CONNECTION)}) if Path(target).is_dir() else []
    if not folders:
        raise DataError(f"no Fabric ledger records ({CONNECTION}) under {target}",
                        hint="pass the directory of a run whose spec used ledger: {use: fabric}")
    checked, notes = 0, []
    for folder in folders:
        connection = json.loads((folder / CONNECTION).read_text())
        if connection.get("simulated"):
            raise DataError("this run used the simulated Fabric gateway (in-process, gone after the run)",
                            where=str(folder), hint="verify runs made on a real network (ledger.settings.network)")
        receipts = _lines(folder / RECEIPTS)
        unconfirmed = {u["tx_id"]: u for u in _lines(folder / UNCONFIRMED)}
        with _reader(connection) as client:
            from fedcore.plugins.ledgers.fabric import consenters, orderer_config

            signers = consenters(orderer_config(client)[1])
            for number, receipt in enumerate(receipts, start=1):
                problem = _check_receipt(client, receipt, signers)
                if problem:
                    return LedgerVerification(False, checked, number, f"{folder / RECEIPTS} line {number}: {problem}")
                checked += len(receipt["entries"])
            on_chain = json.loads(client.evaluate("GetRunEntries", connection["run_id"]))
        local = {(r["tx_id"], i): e for r in receipts for i, e in enumerate(r["entries"])}
        late = 0
        for entry in on_chain:
            key = (entry["txId"], entry["index"])
            if key in local:
                if _fields(entry) != _fields(local[key]):
                    line = next(n for n, r in enumerate(receipts, start=1) if r["tx_id"] == entry["txId"])
                    return LedgerVerification(False, checked, line, f"{folder / RECEIPTS} line {line}: the chaincode's "
                                              f"entry {entry['index']} of {entry['txId']} differs from the local record")
                local.pop(key)
            elif entry["txId"] in unconfirmed:
                late += 1
            else:
                return LedgerVerification(False, checked, None, f"{folder}: the channel holds an entry of this run "
                                          f"(tx {entry['txId']}) that the run's records do not list")
        if local:
            tx_id, _ = next(iter(local))
            return LedgerVerification(False, checked, None, f"{folder}: entry of tx {tx_id} is in the run's records "
                                      "but not in the chaincode's state")
        if late:
            notes.append(f"{late} entries of {folder.name} were ordered after the run gave up on them (listed unconfirmed)")
    message = f"re-read from the channel's blocks and chaincode ({len(folders)} ledger folders)"
    return LedgerVerification(True, checked, None, "; ".join([message, *notes]))


def _fields(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry.get(k) if k != "metadata" else (entry.get(k) or {}) for k in FIELDS}


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise DataError(f"not JSON lines: {exc}", where=str(path)) from None


def _der_header(number: int, previous_hash: bytes, data_hash: bytes) -> bytes:
    """Fabric's block header bytes: DER of SEQUENCE {INTEGER number, OCTET STRING previous, OCTET STRING data}."""
    def tlv(tag: int, value: bytes) -> bytes:
        n = len(value)
        length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag]) + length + value

    integer = number.to_bytes(max(1, (number.bit_length() + 8) // 8), "big")  # a leading 0 keeps it non-negative
    return tlv(0x30, tlv(0x02, integer) + tlv(0x04, previous_hash) + tlv(0x04, data_hash))


def bft_signers(block: Any, signers: list[Any]) -> tuple[set[int], str | None]:
    """The consenter ids whose signature on ``block``'s header verifies; or why the block itself is malformed."""
    import hashlib

    from cryptography import x509
    from fabric_protos.common import common_pb2

    from fedcore.plugins.ledgers.fabric.protocol import verify_low_s

    if hashlib.sha256(b"".join(block.data.data)).digest() != block.header.data_hash:
        return set(), f"block {block.header.number}'s data hash does not match its transactions"
    by_id = {c.id: x509.load_pem_x509_certificate(c.identity) for c in signers}
    metadata = common_pb2.Metadata.FromString(block.metadata.metadata[common_pb2.BlockMetadataIndex.SIGNATURES])
    header = _der_header(block.header.number, block.header.previous_hash, block.header.data_hash)
    valid = set()
    for signature in metadata.signatures:
        if not signature.identifier_header:
            continue
        identifier = common_pb2.IdentifierHeader.FromString(signature.identifier_header).identifier
        certificate = by_id.get(identifier)
        message = metadata.value + signature.identifier_header + header
        if certificate is not None and verify_low_s(certificate, signature.signature, message) is None:
            valid.add(identifier)
    return valid, None


def _check_receipt(client: Any, receipt: dict[str, Any], signers: list[Any]) -> str | None:
    """None when the receipt's transaction is VALID in its block, the block is signed by a BFT quorum of the
    consenters, and the transaction wrote exactly the receipt's entries."""
    from fabric_protos.common import common_pb2
    from fabric_protos.ledger.rwset import rwset_pb2
    from fabric_protos.ledger.rwset.kvrwset import kv_rwset_pb2
    from fabric_protos.peer import proposal_pb2, proposal_response_pb2, transaction_pb2

    from fedcore.plugins.ledgers.fabric import block_bytes

    from fedcore.plugins.ledgers.fabric.network import bft_quorum

    block = common_pb2.Block.FromString(block_bytes(client, int(receipt["block"])))
    if signers:
        valid, malformed = bft_signers(block, signers)
        if malformed:
            return malformed
        if len(valid) < bft_quorum(len(signers)):
            return (f"block {receipt['block']} carries valid signatures of {len(valid)} consenters, "
                    f"fewer than the BFT quorum of {bft_quorum(len(signers))}")
    flags = block.metadata.metadata[common_pb2.BlockMetadataIndex.TRANSACTIONS_FILTER]
    for index, data in enumerate(block.data.data):
        payload = common_pb2.Payload.FromString(common_pb2.Envelope.FromString(data).payload)
        header = common_pb2.ChannelHeader.FromString(payload.header.channel_header)
        if header.tx_id != receipt["tx_id"]:
            continue
        if flags[index] != transaction_pb2.TxValidationCode.VALID:
            return f"tx {receipt['tx_id']} is {transaction_pb2.TxValidationCode.Name(flags[index])} in block {receipt['block']}"
        transaction = transaction_pb2.Transaction.FromString(payload.data)
        action = transaction_pb2.ChaincodeActionPayload.FromString(transaction.actions[0].payload)
        response = proposal_response_pb2.ProposalResponsePayload.FromString(action.action.proposal_response_payload)
        results = proposal_pb2.ChaincodeAction.FromString(response.extension).results
        written = []
        for ns in rwset_pb2.TxReadWriteSet.FromString(results).ns_rwset:
            for write in kv_rwset_pb2.KVRWSet.FromString(ns.rwset).writes:
                written.append(json.loads(write.value))
        written.sort(key=lambda e: e["index"])
        if [_fields(e) for e in written] != [_fields(e) for e in receipt["entries"]]:
            return f"the entries written by tx {receipt['tx_id']} in block {receipt['block']} differ from the local record"
        return None
    return f"tx {receipt['tx_id']} is not in block {receipt['block']}"


def _reader(connection: dict[str, Any]) -> Any:
    """A client as the coordinator (``server``), through its own peer."""
    from fedcore.plugins.ledgers.fabric.network import LocalNetwork, connect

    if connection.get("network") is None:
        raise DataError("this run wrote to an existing network given by endpoint; verify needs its connection",
                        hint="re-run with ledger.settings.network, or query GetRunEntries with the peer CLI")
    profile = LocalNetwork(Path(connection["network"])).profile()
    if profile is None:
        raise DataError(f"the Fabric network {connection['network']} is gone", hint="the run's ledger lived there")
    clients = connect(profile)
    server = clients.pop("server")
    for other in clients.values():
        other.close()

    class _One:
        def __enter__(self) -> Any:
            return server

        def __exit__(self, *exc: Any) -> None:
            server.close()

    return _One()
