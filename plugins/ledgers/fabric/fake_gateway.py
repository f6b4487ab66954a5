"""FakeFabricGateway: an in-process gRPC Fabric Gateway for machines that cannot run a Fabric network.

A fake, and named one: it is one process standing in for a peer with the
Gateway service and an orderer that puts each transaction in its own block
(no consensus). What it does faithfully, on the official protobuf messages:

- Endorse/Evaluate: parses the SignedProposal, checks the channel header
  (type, channel, tx id), that the tx id is SHA-256(nonce || creator), that
  the creator's certificate chains to a trusted MSP CA and is valid now, that
  the ECDSA signature verifies and has low S, and that the tx id is not reused;
  then runs the real JavaScript chaincode (``chaincode/host.js``: the contract
  on fabric-shim's ChaincodeStub) and signs a ProposalResponsePayload with
  the peer's identity into a prepared transaction Envelope.
- Submit: checks the Envelope's signature by the same creator and that its
  endorsement is the one this peer signed, then validates (MVCC read versions)
  and commits the write set in a new block.
- CommitStatus: checks the signed request and returns the validation code
  and block number.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc
from fabric_protos.ledger.rwset import rwset_pb2
from fabric_protos.ledger.rwset.kvrwset import kv_rwset_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2, proposal_response_pb2, transaction_pb2

from fedcore.plugins.ledgers.fabric.devca import DevCA
from fedcore.plugins.ledgers.fabric.protocol import Identity, proposal_hash, transaction_id, verify_low_s

CHAINCODE_DIR = Path(__file__).resolve().parent / "chaincode"
CONSENSUS = "none: simulated Fabric gateway (FakeFabricGateway in process: one peer, one block per transaction, no orderer)"
MAX_CLOCK_SKEW = dt.timedelta(minutes=15)


def chaincode_unavailable_reason() -> str | None:
    """Why the real chaincode cannot run here (Node or its node_modules missing), or None."""
    if shutil.which("node") is None:
        return "Node.js is not installed (the fake gateway runs the real JavaScript chaincode)"
    if not (CHAINCODE_DIR / "node_modules" / "fabric-contract-api").is_dir():
        return f"chaincode dependencies missing: run `npm ci --prefix {CHAINCODE_DIR}`"
    return None


class ChaincodeHost:
    """The Node process running the real chaincode (``host.js``), one request at a time."""

    def __init__(self) -> None:
        reason = chaincode_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self._process = subprocess.Popen(
            ["node", str(CHAINCODE_DIR / "host.js")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=CHAINCODE_DIR,
        )
        self._lock = threading.Lock()

    def request(self, message: dict) -> dict:
        with self._lock:
            assert self._process.stdin is not None and self._process.stdout is not None
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
            while True:
                line = self._process.stdout.readline()
                if not line:
                    raise RuntimeError("chaincode host exited")
                if line.startswith("@@fedcore "):
                    return json.loads(line[len("@@fedcore ") :])

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Pending:
    creator: bytes
    payload_bytes: bytes
    rwset: dict
    endorsement_payload: bytes


@dataclass
class _State:
    values: dict[str, tuple[bytes, tuple[int, int]]] = field(default_factory=dict)
    status: dict[str, tuple[int, int]] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    seen_tx_ids: set[str] = field(default_factory=set)
    height: int = 1  # block 0 is the channel's genesis block


class FakeFabricGateway(gateway_pb2_grpc.GatewayServicer):
    """The Gateway service of one fake peer for ``channel`` with ``chaincode`` deployed."""

    def __init__(self, channel: str, chaincode: str, trusted_cas: dict[str, bytes], peer: Identity) -> None:
        self.channel = channel
        self.chaincode = chaincode
        self.trusted_cas = {msp: x509.load_pem_x509_certificate(pem) for msp, pem in trusted_cas.items()}
        self.peer = peer
        self.state = _State()
        self.host = ChaincodeHost()
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.rejections: list[str] = []

    # ------------------------------------------------------------ checks

    def _creator(self, serialized: bytes) -> x509.Certificate:
        identity = identities_pb2.SerializedIdentity.FromString(serialized)
        ca = self.trusted_cas.get(identity.mspid)
        if ca is None:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, f"unknown MSP '{identity.mspid}'")
        try:
            certificate = x509.load_pem_x509_certificate(identity.id_bytes)
            ca_key = ca.public_key()
            assert isinstance(ca_key, ec.EllipticCurvePublicKey)
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, f"creator certificate is not issued by {identity.mspid}'s CA") from None
        now = dt.datetime.now(dt.timezone.utc)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, "creator certificate has expired or is not yet valid")
        return certificate

    def _check_signed(self, serialized_creator: bytes, signature: bytes, message: bytes) -> None:
        problem = verify_low_s(self._creator(serialized_creator), signature, message)
        if problem is not None:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, f"access denied: {problem}")

    def _parse_proposal(self, request_tx_id: str, request_channel: str, signed: proposal_pb2.SignedProposal):
        try:
            proposal = proposal_pb2.Proposal.FromString(signed.proposal_bytes)
            header = common_pb2.Header.FromString(proposal.header)
            channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
            signature_header = common_pb2.SignatureHeader.FromString(header.signature_header)
            payload = proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload)
            extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
        except Exception as exc:  # protobuf raises DecodeError and others for garbage
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"malformed proposal: {exc}") from None
        if channel_header.type != common_pb2.HeaderType.ENDORSER_TRANSACTION:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "not an endorser transaction")
        if channel_header.channel_id != self.channel or request_channel != self.channel:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"channel '{channel_header.channel_id}' not found")
        if not signature_header.nonce:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "empty nonce")
        if transaction_id(signature_header.nonce, signature_header.creator) != channel_header.tx_id:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "incorrect transaction id: not SHA-256(nonce || creator)")
        if request_tx_id != channel_header.tx_id:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "request transaction id differs from the proposal's")
        if extension.chaincode_id.name != self.chaincode:
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"chaincode '{extension.chaincode_id.name}' not found")
        skew = abs(dt.datetime.now(dt.timezone.utc) - channel_header.timestamp.ToDatetime(dt.timezone.utc))
        if skew > MAX_CLOCK_SKEW:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "proposal timestamp too far from the peer's clock")
        self._check_signed(signature_header.creator, signed.signature, signed.proposal_bytes)
        return header, signature_header, payload

    def _simulate(self, signed: proposal_pb2.SignedProposal, tx_id: str) -> dict:
        reply = self.host.request(
            {"op": "invoke", "channel": self.channel, "txId": tx_id, "signedProposal": base64.b64encode(signed.SerializeToString()).decode()}
        )
        if reply["status"] >= 400:
            raise Rejected(grpc.StatusCode.ABORTED, f"chaincode response {reply['status']}: {reply['message']}")
        return reply

    # ------------------------------------------------------------ service

    def Evaluate(self, request: gateway_pb2.EvaluateRequest, context: grpc.ServicerContext) -> gateway_pb2.EvaluateResponse:
        try:
            self._parse_proposal(request.transaction_id, request.channel_id, request.proposed_transaction)
            reply = self._simulate(request.proposed_transaction, request.transaction_id)
        except Rejected as exc:
            return self._abort(context, exc)
        response = proposal_response_pb2.Response(status=reply["status"], message=reply["message"], payload=base64.b64decode(reply["payload"]))
        return gateway_pb2.EvaluateResponse(result=response)

    def Endorse(self, request: gateway_pb2.EndorseRequest, context: grpc.ServicerContext) -> gateway_pb2.EndorseResponse:
        try:
            header, signature_header, payload = self._parse_proposal(
                request.transaction_id, request.channel_id, request.proposed_transaction
            )
            with self._lock:
                if request.transaction_id in self.state.seen_tx_ids:
                    raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"duplicate transaction id {request.transaction_id}")
                self.state.seen_tx_ids.add(request.transaction_id)
            reply = self._simulate(request.proposed_transaction, request.transaction_id)
        except Rejected as exc:
            return self._abort(context, exc)
        response = proposal_response_pb2.Response(status=reply["status"], message=reply["message"], payload=base64.b64decode(reply["payload"]))
        action = proposal_pb2.ChaincodeAction(
            results=_rwset_bytes(self.chaincode, reply["rwset"]),
            response=response,
            chaincode_id=chaincode_pb2.ChaincodeID(name=self.chaincode, version="1.0"),
        )
        prp = proposal_response_pb2.ProposalResponsePayload(
            proposal_hash=proposal_hash(header, payload), extension=action.SerializeToString()
        ).SerializeToString()
        endorser = self.peer.serialized()
        endorsement = proposal_response_pb2.Endorsement(endorser=endorser, signature=self.peer.sign(prp + endorser))
        transaction = transaction_pb2.Transaction(
            actions=[
                transaction_pb2.TransactionAction(
                    header=header.signature_header,
                    payload=transaction_pb2.ChaincodeActionPayload(
                        chaincode_proposal_payload=proposal_pb2.ChaincodeProposalPayload(input=payload.input).SerializeToString(),
                        action=transaction_pb2.ChaincodeEndorsedAction(proposal_response_payload=prp, endorsements=[endorsement]),
                    ).SerializeToString(),
                )
            ]
        )
        payload_bytes = common_pb2.Payload(header=header, data=transaction.SerializeToString()).SerializeToString()
        with self._lock:
            self.state.pending[request.transaction_id] = _Pending(signature_header.creator, payload_bytes, reply["rwset"], prp)
        return gateway_pb2.EndorseResponse(prepared_transaction=common_pb2.Envelope(payload=payload_bytes))

    def Submit(self, request: gateway_pb2.SubmitRequest, context: grpc.ServicerContext) -> gateway_pb2.SubmitResponse:
        try:
            envelope = request.prepared_transaction
            try:
                payload = common_pb2.Payload.FromString(envelope.payload)
                channel_header = common_pb2.ChannelHeader.FromString(payload.header.channel_header)
                signature_header = common_pb2.SignatureHeader.FromString(payload.header.signature_header)
            except Exception as exc:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"malformed transaction: {exc}") from None
            if channel_header.tx_id != request.transaction_id or request.channel_id != self.channel:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "transaction id or channel differs from the request")
            self._check_signed(signature_header.creator, envelope.signature, envelope.payload)
            with self._lock:
                pending = self.state.pending.pop(request.transaction_id, None)
                if pending is None:
                    raise Rejected(grpc.StatusCode.NOT_FOUND, "no endorsed transaction with this id")
                if pending.creator != signature_header.creator:
                    raise Rejected(grpc.StatusCode.PERMISSION_DENIED, "submitter is not the proposal's creator")
                code = self._validate(pending, envelope.payload)
                self._commit(request.transaction_id, pending, code)
        except Rejected as exc:
            return self._abort(context, exc)
        return gateway_pb2.SubmitResponse()

    def _validate(self, pending: _Pending, payload_bytes: bytes) -> int:
        """The committing peer's validation: endorsement intact, then MVCC read versions."""
        if payload_bytes != pending.payload_bytes:
            return transaction_pb2.TxValidationCode.ENDORSEMENT_POLICY_FAILURE
        values = self.state.values
        for read in pending.rwset["reads"]:
            current = values.get(read["key"])
            if (current[1] if current else None) != (tuple(read["version"]) if read["version"] else None):
                return transaction_pb2.TxValidationCode.MVCC_READ_CONFLICT
        for query in pending.rwset["rangeReads"]:
            now = sorted(k for k in values if query["startKey"] <= k and (not query["endKey"] or k < query["endKey"]))
            if now != [k for k, _ in query["keys"]]:
                return transaction_pb2.TxValidationCode.PHANTOM_READ_CONFLICT
        return transaction_pb2.TxValidationCode.VALID

    def _commit(self, tx_id: str, pending: _Pending, code: int) -> None:
        block = self.state.height
        self.state.height += 1
        self.state.status[tx_id] = (code, block)
        if code != transaction_pb2.TxValidationCode.VALID:
            self.rejections.append(f"{tx_id}: {transaction_pb2.TxValidationCode.Name(code)}")
            return
        writes = []
        for write in pending.rwset["writes"]:
            if write["value"] is None:
                self.state.values.pop(write["key"], None)
            else:
                self.state.values[write["key"]] = (base64.b64decode(write["value"]), (block, 0))
            writes.append({"key": write["key"], "value": write["value"], "version": [block, 0]})
        self.host.request({"op": "commit", "writes": writes})

    def CommitStatus(
        self, request: gateway_pb2.SignedCommitStatusRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.CommitStatusResponse:
        try:
            inner = gateway_pb2.CommitStatusRequest.FromString(request.request)
            self._check_signed(inner.identity, request.signature, request.request)
            with self._lock:
                status = self.state.status.get(inner.transaction_id)
            if status is None:
                raise Rejected(grpc.StatusCode.NOT_FOUND, f"transaction {inner.transaction_id} not committed")
        except Rejected as exc:
            return self._abort(context, exc)
        return gateway_pb2.CommitStatusResponse(result=status[0], block_number=status[1])

    def _abort(self, context: grpc.ServicerContext, exc: Rejected):  # type: ignore[no-untyped-def]
        self.rejections.append(str(exc))
        context.abort(exc.code, str(exc))

    # ------------------------------------------------------------ lifecycle

    def start(self, address: str = "127.0.0.1:0", tls: tuple[bytes, bytes] | None = None) -> int:
        """Serve on ``address`` (TLS when ``tls`` = (cert PEM, key PEM)); returns the port."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        gateway_pb2_grpc.add_GatewayServicer_to_server(self, server)
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
        server.start()
        self._server = server
        return port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
        self.host.close()


def _rwset_bytes(namespace: str, rwset: dict) -> bytes:
    def version(v: list[int] | None) -> kv_rwset_pb2.Version | None:
        return kv_rwset_pb2.Version(block_num=v[0], tx_num=v[1]) if v else None

    kv = kv_rwset_pb2.KVRWSet(
        reads=[kv_rwset_pb2.KVRead(key=r["key"], version=version(r["version"])) for r in rwset["reads"]],
        range_queries_info=[
            kv_rwset_pb2.RangeQueryInfo(
                start_key=q["startKey"],
                end_key=q["endKey"],
                itr_exhausted=True,
                raw_reads=kv_rwset_pb2.QueryReads(kv_reads=[kv_rwset_pb2.KVRead(key=k, version=version(v)) for k, v in q["keys"]]),
            )
            for q in rwset["rangeReads"]
        ],
        writes=[
            kv_rwset_pb2.KVWrite(key=w["key"], is_delete=w["value"] is None, value=base64.b64decode(w["value"] or ""))
            for w in rwset["writes"]
        ],
    )
    return rwset_pb2.TxReadWriteSet(
        data_model=rwset_pb2.TxReadWriteSet.KV,
        ns_rwset=[rwset_pb2.NsReadWriteSet(namespace=namespace, rwset=kv.SerializeToString())],
    ).SerializeToString()


def start_fake_network(
    channel: str, chaincode: str, participants: list[str], msp_id: str = "FedcoreMSP", tls: bool = False
) -> tuple[FakeFabricGateway, str, dict[str, Identity], bytes | None]:
    """A fake gateway with a dev CA: (gateway, endpoint, identities by participant, TLS CA PEM or None)."""
    ca = DevCA(msp_id)
    peer = ca.issue("peer0")
    gateway = FakeFabricGateway(channel, chaincode, {msp_id: ca.certificate_pem}, peer)
    tls_pair = None
    if tls:
        server = ca.issue("localhost", hostnames=("localhost", "127.0.0.1"))
        from fedcore.plugins.ledgers.fabric.devca import private_key_pem

        tls_pair = (server.certificate_pem, private_key_pem(server))
    port = gateway.start("127.0.0.1:0", tls_pair)
    identities = {p: ca.issue(p) for p in participants}
    return gateway, f"127.0.0.1:{port}", identities, ca.certificate_pem if tls else None


def digest_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
