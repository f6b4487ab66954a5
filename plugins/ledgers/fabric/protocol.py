"""Fabric transaction messages on the official protobuf definitions (``hyperledger-fabric-protos``).

Shared by the Gateway client and :class:`FakeFabricGateway`: how a proposal is
built and signed, how the transaction id is derived, and what a peer's
endorsement covers. Signatures are ECDSA P-256 over SHA-256, DER-encoded with
low S (Fabric's BCCSP rejects high-S signatures).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from fabric_protos.common import common_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2
from google.protobuf.timestamp_pb2 import Timestamp

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class Identity:
    """An MSP identity: its MSP id, X.509 certificate and (for a signer) private key."""

    msp_id: str
    certificate_pem: bytes
    private_key: ec.EllipticCurvePrivateKey | None = None

    def serialized(self) -> bytes:
        return identities_pb2.SerializedIdentity(mspid=self.msp_id, id_bytes=self.certificate_pem).SerializeToString()

    def sign(self, message: bytes) -> bytes:
        if self.private_key is None:
            raise ValueError("identity has no private key")
        return sign_low_s(self.private_key, message)

    @classmethod
    def from_files(cls, msp_id: str, cert_path: str, key_path: str) -> Identity:
        key = serialization.load_pem_private_key(open(key_path, "rb").read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("Fabric identities use ECDSA keys")
        return cls(msp_id, open(cert_path, "rb").read(), key)


def sign_low_s(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    if s > P256_ORDER // 2:
        s = P256_ORDER - s
    return encode_dss_signature(r, s)


def verify_low_s(certificate: x509.Certificate, signature: bytes, message: bytes) -> str | None:
    """None when ``signature`` is a valid low-S ECDSA signature of ``message``, else why not."""
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return "creator key is not ECDSA"
    try:
        _, s = decode_dss_signature(signature)
    except ValueError:
        return "signature is not DER"
    if s > P256_ORDER // 2:
        return "signature has high S (Fabric requires low-S)"
    try:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "signature does not verify"
    return None


def transaction_id(nonce: bytes, creator: bytes) -> str:
    """Fabric's transaction id: hex SHA-256 of nonce || serialized creator."""
    return hashlib.sha256(nonce + creator).hexdigest()


@dataclass(frozen=True)
class Proposal:
    tx_id: str
    proposal_bytes: bytes
    signature: bytes


def build_proposal(
    identity: Identity, channel: str, chaincode: str, args: list[bytes], now: datetime | None = None
) -> Proposal:
    """An ENDORSER_TRANSACTION proposal invoking ``chaincode`` with ``args`` (function first), signed."""
    creator = identity.serialized()
    nonce = os.urandom(24)
    tx_id = transaction_id(nonce, creator)
    timestamp = Timestamp()
    timestamp.FromDatetime(now or datetime.now(timezone.utc))
    channel_header = common_pb2.ChannelHeader(
        type=common_pb2.HeaderType.ENDORSER_TRANSACTION,
        channel_id=channel,
        tx_id=tx_id,
        timestamp=timestamp,
        extension=proposal_pb2.ChaincodeHeaderExtension(
            chaincode_id=chaincode_pb2.ChaincodeID(name=chaincode)
        ).SerializeToString(),
    )
    signature_header = common_pb2.SignatureHeader(creator=creator, nonce=nonce)
    invocation = chaincode_pb2.ChaincodeInvocationSpec(
        chaincode_spec=chaincode_pb2.ChaincodeSpec(
            type=chaincode_pb2.ChaincodeSpec.NODE,
            chaincode_id=chaincode_pb2.ChaincodeID(name=chaincode),
            input=chaincode_pb2.ChaincodeInput(args=args),
        )
    )
    proposal = proposal_pb2.Proposal(
        header=common_pb2.Header(
            channel_header=channel_header.SerializeToString(), signature_header=signature_header.SerializeToString()
        ).SerializeToString(),
        payload=proposal_pb2.ChaincodeProposalPayload(input=invocation.SerializeToString()).SerializeToString(),
    )
    proposal_bytes = proposal.SerializeToString()
    return Proposal(tx_id, proposal_bytes, identity.sign(proposal_bytes))


def proposal_hash(header: common_pb2.Header, payload: proposal_pb2.ChaincodeProposalPayload) -> bytes:
    """What a proposal response commits to: the headers and the payload without its transient map."""
    public = proposal_pb2.ChaincodeProposalPayload(input=payload.input)
    digest = hashlib.sha256()
    digest.update(header.channel_header)
    digest.update(header.signature_header)
    digest.update(public.SerializeToString())
    return digest.digest()
