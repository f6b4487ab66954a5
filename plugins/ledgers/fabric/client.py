"""A Fabric Gateway client in Python: Endorse -> Submit -> CommitStatus, and Evaluate for reads."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc
from fabric_protos.peer import proposal_pb2, transaction_pb2

from fedcore.plugins.ledgers.fabric.protocol import Identity, build_proposal


SUBMIT_FAILURE_GRACE = 5.0  # seconds to look for the commit of a transaction whose submission was reported failed


class FabricTransactionError(Exception):
    """The gateway refused a proposal, or the transaction did not commit as VALID.

    ``tx_id`` is set when the endorsed transaction was handed to the orderers (some may hold it and
    order it later): such a transaction is "submitted, not confirmed", never "committed".
    """

    def __init__(self, message: str, tx_id: str | None = None) -> None:
        super().__init__(message)
        self.tx_id = tx_id


class CommitTimeout(FabricTransactionError):
    """The transaction was submitted but its commit was not seen in time (it may still commit later)."""


@dataclass(frozen=True)
class Committed:
    tx_id: str
    block_number: int
    result: bytes
    seconds: float


class GatewayClient:
    """One identity's connection to a Fabric Gateway peer for one channel and chaincode."""

    def __init__(
        self,
        endpoint: str,
        identity: Identity,
        channel: str,
        chaincode: str,
        tls_ca_pem: bytes | None = None,
        server_name: str | None = None,
        timeout: float = 30.0,
        tls_client_cert_pem: bytes | None = None,
        tls_client_key_pem: bytes | None = None,
        endorsing_organizations: tuple[str, ...] = (),
        commit_timeout: float | None = None,
    ) -> None:
        """``tls_client_*``: the mutual-TLS client pair a peer with ``clientAuthRequired`` asks for;
        ``endorsing_organizations``: the MSP ids whose peers must endorse (empty: the gateway's plan);
        ``commit_timeout``: how long to wait for the commit after the orderers accepted the transaction."""
        self.identity = identity
        self.channel_name = channel
        self.chaincode = chaincode
        self.timeout = timeout
        self.commit_timeout = timeout if commit_timeout is None else commit_timeout
        self.endorsing_organizations = list(endorsing_organizations)
        if tls_ca_pem is None:
            self._channel = grpc.insecure_channel(endpoint)
        else:
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            credentials = grpc.ssl_channel_credentials(tls_ca_pem, tls_client_key_pem, tls_client_cert_pem)
            self._channel = grpc.secure_channel(endpoint, credentials, options=options)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def _signed_proposal(
        self, function: str, args: list[str], chaincode: str | None = None
    ) -> tuple[str, proposal_pb2.SignedProposal]:
        proposal = build_proposal(
            self.identity, self.channel_name, chaincode or self.chaincode, [function.encode(), *(a.encode() for a in args)]
        )
        return proposal.tx_id, proposal_pb2.SignedProposal(proposal_bytes=proposal.proposal_bytes, signature=proposal.signature)

    def evaluate(self, function: str, *args: str, chaincode: str | None = None) -> bytes:
        """A read on the gateway peer (``chaincode``: another one, e.g. the system chaincode ``qscc``)."""
        tx_id, signed = self._signed_proposal(function, list(args), chaincode)
        try:
            response = self._stub.Evaluate(
                gateway_pb2.EvaluateRequest(transaction_id=tx_id, channel_id=self.channel_name, proposed_transaction=signed),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            raise FabricTransactionError(f"evaluate {function}: {exc.code().name}: {_details(exc)}") from None
        return response.result.payload

    def submit(self, function: str, *args: str) -> Committed:
        start = time.perf_counter()
        tx_id, signed = self._signed_proposal(function, list(args))
        try:
            endorsed = self._stub.Endorse(
                gateway_pb2.EndorseRequest(
                    transaction_id=tx_id, channel_id=self.channel_name, proposed_transaction=signed,
                    endorsing_organizations=self.endorsing_organizations,
                ),
                timeout=self.timeout,
            )
            envelope = endorsed.prepared_transaction
            result = _chaincode_result(envelope.payload)
            signed_envelope = common_pb2.Envelope(payload=envelope.payload, signature=self.identity.sign(envelope.payload))
        except grpc.RpcError as exc:
            raise FabricTransactionError(f"endorse {function}: {exc.code().name}: {_details(exc)}") from None
        try:
            self._stub.Submit(
                gateway_pb2.SubmitRequest(transaction_id=tx_id, channel_id=self.channel_name, prepared_transaction=signed_envelope),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            # With BFT the gateway needs a quorum of orderers to accept the transaction; an orderer that already
            # got it forwarded by another answers "request already processed", so with one orderer down the
            # gateway can report a failure for a transaction that is ordered all the same (hyperledger/fabric
            # issue 4415). The commit status decides: wait briefly for it before reporting the failure.
            failure = f"submit {function}: {exc.code().name}: {_details(exc)}"
            try:
                status = self.commit_status(tx_id, min(self.commit_timeout, SUBMIT_FAILURE_GRACE))
            except FabricTransactionError:
                raise FabricTransactionError(failure, tx_id) from None
        else:
            status = self.commit_status(tx_id, self.commit_timeout)
        if status.result != transaction_pb2.TxValidationCode.VALID:
            name = transaction_pb2.TxValidationCode.Name(status.result)
            raise FabricTransactionError(f"transaction {tx_id} committed as {name} in block {status.block_number}")
        return Committed(tx_id, status.block_number, result, time.perf_counter() - start)

    def commit_status(self, tx_id: str, timeout: float) -> gateway_pb2.CommitStatusResponse:
        """Wait up to ``timeout`` seconds for ``tx_id``'s commit on the gateway peer; :class:`CommitTimeout` if unseen."""
        request = gateway_pb2.CommitStatusRequest(
            transaction_id=tx_id, channel_id=self.channel_name, identity=self.identity.serialized()
        ).SerializeToString()
        try:
            return self._stub.CommitStatus(
                gateway_pb2.SignedCommitStatusRequest(request=request, signature=self.identity.sign(request)), timeout=timeout
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise CommitTimeout(f"transaction {tx_id} was submitted but not committed within {timeout:g} s", tx_id) from None
            raise FabricTransactionError(f"commit status of {tx_id}: {exc.code().name}: {_details(exc)}") from None

    def close(self) -> None:
        self._channel.close()


def _details(exc: grpc.RpcError) -> str:
    """The gateway's message plus each peer's or orderer's own reason (``ErrorDetail`` in the status details)."""
    message = exc.details() or ""
    trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    reasons = []
    for any_bytes in _fields(trailers.get("grpc-status-details-bin", b""), 3):  # google.rpc.Status.details
        value = next(iter(_fields(any_bytes, 2)), b"")  # google.protobuf.Any.value
        try:
            error = gateway_pb2.ErrorDetail.FromString(value)
        except Exception:  # noqa: BLE001 - not an ErrorDetail
            continue
        if error.message:
            reasons.append(f"{error.msp_id or error.address}: {error.message}")
    return message + (" [" + "; ".join(reasons) + "]" if reasons else "")


def _fields(data: bytes, number: int) -> list[bytes]:
    """The length-delimited fields ``number`` of a protobuf message (enough wire format for google.rpc.Status)."""
    out, i = [], 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    try:
        while i < len(data):
            key = varint()
            wire = key & 7
            if wire == 0:
                varint()
            elif wire == 2:
                length = varint()
                if key >> 3 == number:
                    out.append(data[i:i + length])
                i += length
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            else:
                break
    except IndexError:
        pass
    return out


def _chaincode_result(payload_bytes: bytes) -> bytes:
    """The chaincode's response payload inside a prepared transaction."""
    from fabric_protos.peer import proposal_response_pb2

    payload = common_pb2.Payload.FromString(payload_bytes)
    transaction = transaction_pb2.Transaction.FromString(payload.data)
    action = transaction_pb2.ChaincodeActionPayload.FromString(transaction.actions[0].payload)
    prp = proposal_response_pb2.ProposalResponsePayload.FromString(action.action.proposal_response_payload)
    return proposal_pb2.ChaincodeAction.FromString(prp.extension).response.payload
