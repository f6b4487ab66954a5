"""A development certificate authority: X.509 identities for simulations, tests and the local network.

A real deployment takes each hospital's MSP identity from its Fabric CA; in a
simulation (and for :class:`FakeFabricGateway`) this CA issues them, so the
gateway can check certificate chains exactly as an MSP does. The local Fabric
network (:mod:`fedcore.plugins.ledgers.fabric.network`) uses one per
organization, with Fabric's NodeOUs (``OU=client|peer|orderer|admin``) in the
subjects and CN = the fedcore participant name, which the chaincode checks.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedcore.plugins.ledgers.fabric.protocol import Identity


def _name(common_name: str, organization: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]
    if unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )


class DevCA:
    """One organization's CA (ECDSA P-256), issuing client, peer and TLS server certificates."""

    def __init__(self, msp_id: str, organization: str = "fedcore", days: int = 365) -> None:
        self.msp_id = msp_id
        self.organization = organization
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        name = _name(f"ca.{organization}", organization)
        public = self.key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, common_name: str, hostnames: tuple[str, ...] = (), unit: str | None = None, days: int = 30
    ) -> Identity:
        """A certificate for ``common_name`` (``unit``: its NodeOU; ``hostnames``: TLS subject alternative names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, self.organization, unit))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if hostnames:
            names: list[x509.GeneralName] = []
            for host in hostnames:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return Identity(self.msp_id, certificate.public_bytes(serialization.Encoding.PEM), key)

    def write(self, identity: Identity, directory: Path, stem: str) -> tuple[Path, Path]:
        """``stem.cert.pem`` and ``stem.key.pem`` (0600) under ``directory``."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert, key = directory / f"{stem}.cert.pem", directory / f"{stem}.key.pem"
        cert.write_bytes(identity.certificate_pem)
        assert identity.private_key is not None
        key.touch(mode=0o600)
        key.write_bytes(
            identity.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert, key


def private_key_pem(identity: Identity) -> bytes:
    assert identity.private_key is not None
    return identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
