"""A Fabric Gateway client in Python: Endorse -> Submit -> CommitStatus, and Evaluate for reads."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc
from fabric_protos.peer import proposal_pb2, transaction_pb2

from fedcore.plugins.ledgers.fabric.protocol import Identity, build_proposal


class FabricTransactionError(Exception):
    """The gateway refused a proposal, or the transaction did not commit as VALID."""


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
    ) -> None:
        self.identity = identity
        self.channel_name = channel
        self.chaincode = chaincode
        self.timeout = timeout
        if tls_ca_pem is None:
            self._channel = grpc.insecure_channel(endpoint)
        else:
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self._channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(tls_ca_pem), options=options)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def _signed_proposal(self, function: str, args: list[str]) -> tuple[str, proposal_pb2.SignedProposal]:
        proposal = build_proposal(self.identity, self.channel_name, self.chaincode, [function.encode(), *(a.encode() for a in args)])
        return proposal.tx_id, proposal_pb2.SignedProposal(proposal_bytes=proposal.proposal_bytes, signature=proposal.signature)

    def evaluate(self, function: str, *args: str) -> bytes:
        tx_id, signed = self._signed_proposal(function, list(args))
        try:
            response = self._stub.Evaluate(
                gateway_pb2.EvaluateRequest(transaction_id=tx_id, channel_id=self.channel_name, proposed_transaction=signed),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            raise FabricTransactionError(f"evaluate {function}: {exc.code().name}: {exc.details()}") from None
        return response.result.payload

    def submit(self, function: str, *args: str) -> Committed:
        start = time.perf_counter()
        tx_id, signed = self._signed_proposal(function, list(args))
        try:
            endorsed = self._stub.Endorse(
                gateway_pb2.EndorseRequest(transaction_id=tx_id, channel_id=self.channel_name, proposed_transaction=signed),
                timeout=self.timeout,
            )
            envelope = endorsed.prepared_transaction
            result = _chaincode_result(envelope.payload)
            signed_envelope = common_pb2.Envelope(payload=envelope.payload, signature=self.identity.sign(envelope.payload))
            self._stub.Submit(
                gateway_pb2.SubmitRequest(transaction_id=tx_id, channel_id=self.channel_name, prepared_transaction=signed_envelope),
                timeout=self.timeout,
            )
            status_request = gateway_pb2.CommitStatusRequest(
                transaction_id=tx_id, channel_id=self.channel_name, identity=self.identity.serialized()
            ).SerializeToString()
            status = self._stub.CommitStatus(
                gateway_pb2.SignedCommitStatusRequest(request=status_request, signature=self.identity.sign(status_request)),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            raise FabricTransactionError(f"submit {function}: {exc.code().name}: {exc.details()}") from None
        if status.result != transaction_pb2.TxValidationCode.VALID:
            name = transaction_pb2.TxValidationCode.Name(status.result)
            raise FabricTransactionError(f"transaction {tx_id} committed as {name} in block {status.block_number}")
        return Committed(tx_id, status.block_number, result, time.perf_counter() - start)

    def close(self) -> None:
        self._channel.close()


def _chaincode_result(payload_bytes: bytes) -> bytes:
    """The chaincode's response payload inside a prepared transaction."""
    from fabric_protos.peer import proposal_response_pb2

    payload = common_pb2.Payload.FromString(payload_bytes)
    transaction = transaction_pb2.Transaction.FromString(payload.data)
    action = transaction_pb2.ChaincodeActionPayload.FromString(transaction.actions[0].payload)
    prp = proposal_response_pb2.ProposalResponsePayload.FromString(action.action.proposal_response_payload)
    return proposal_pb2.ChaincodeAction.FromString(prp.extension).response.payload
