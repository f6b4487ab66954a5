"""Participants' signing keys and the public trust anchor that hospitals hold.

Private keys never live in a run directory: anyone holding the directory could
otherwise append validly signed entries. They sit in a key directory outside it
(:func:`default_keys_dir`: ``$FEDCORE_KEYS_DIR``, else
``$XDG_DATA_HOME/fedcore/keys``, else ``~/.local/share/fedcore/keys``; one
subdirectory per signature scheme), one PEM file per participant with mode 0600
in a 0700 directory, created on first use and never overwritten. In simulation
one machine plays every participant, so one key directory holds every
participant's key; deployed, each party holds only its own.

The public keys are written to ``public-keys.json`` next to each ledger: that
file (or the fingerprints in it) is the trust anchor a hospital keeps, and
verification takes expected keys only from there, never from the ledger itself.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedcore.errors import DataError

Algorithm = Literal["ed25519", "ecdsa-p256"]
KEYS_FORMAT = "fedcore-ledger-keys-v1"
PUBLIC_KEYS_FILE = "public-keys.json"
#: environment variable naming the private key directory
KEYS_DIR_ENV = "FEDCORE_KEYS_DIR"


def default_keys_dir(algorithm: Algorithm) -> Path:
    """Where private signing keys live unless ``ledger.settings.keys_dir`` says otherwise."""
    base = os.environ.get(KEYS_DIR_ENV)
    if base:
        root = Path(base).expanduser()
    else:
        data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        root = Path(data_home) / "fedcore" / "keys"
    return root / algorithm

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def generate_private_key(algorithm: Algorithm) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def algorithm_of(key: PrivateKey | PublicKey) -> Algorithm:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def sign(key: PrivateKey, message: bytes) -> bytes:
    """Ed25519 over the message, or ECDSA P-256 over SHA-256(message), DER-encoded."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_signature(key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def public_pem(key: PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(key: PublicKey) -> str:
    """``sha256:`` + hex SHA-256 of the key's DER SubjectPublicKeyInfo (what ``openssl pkey -pubin -outform DER`` prints)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def load_public_pem(text: str) -> PublicKey:
    key = serialization.load_pem_public_key(text.encode())
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("not an Ed25519 or ECDSA public key")
    return key


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class TrustAnchor:
    """Expected public keys (or only their fingerprints) by participant, from outside the ledger."""

    keys: Mapping[str, PublicKey]
    fingerprints: Mapping[str, str]
    source: str

    def expected_fingerprint(self, participant: str) -> str | None:
        return self.fingerprints.get(participant)

    @classmethod
    def from_fingerprints(cls, fingerprints: Mapping[str, str], source: str) -> TrustAnchor:
        return cls(keys={}, fingerprints=dict(fingerprints), source=source)

    @classmethod
    def load(cls, path: Path) -> TrustAnchor:
        """Read a ``public-keys.json``; a missing or malformed file is a :class:`DataError`."""
        hint = f"pass the {PUBLIC_KEYS_FILE} written with the run (--keys FILE)"
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("keys file not found", where=str(path), hint=hint) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"unreadable keys file ({type(exc).__name__})", where=str(path), hint=hint) from None
        if not isinstance(document, dict) or document.get("format") != KEYS_FORMAT:
            raise DataError(f"not a {KEYS_FORMAT} file", where=str(path), hint=hint)
        keys: dict[str, PublicKey] = {}
        fingerprints: dict[str, str] = {}
        for name, entry in (document.get("keys") or {}).items():
            try:
                key = load_public_pem(entry["public_key_pem"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"bad public key for '{name}'", where=f"{path}: keys.{name}", hint=hint) from None
            if entry.get("fingerprint") not in (None, fingerprint(key)):
                raise DataError(
                    f"fingerprint of '{name}' does not match its key", where=f"{path}: keys.{name}", hint=hint
                )
            keys[name] = key
            fingerprints[name] = fingerprint(key)
        if not keys:
            raise DataError("keys file lists no keys", where=str(path), hint=hint)
        return cls(keys=keys, fingerprints=fingerprints, source=str(path))


class KeyRing:
    """Private keys of participants under ``directory`` (0700), created on first use.

    Many trainings (sweep arms, repeats, runs, possibly in parallel processes)
    share one key directory, so a file lock serializes key creation, and a key
    file is created exclusively: an existing one is loaded, never replaced.
    """

    def __init__(self, directory: Path, algorithm: Algorithm) -> None:
        self.directory = directory
        self.algorithm = algorithm
        self._keys: dict[str, PrivateKey] = {}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _key_path(self, participant: str) -> Path:
        if not participant or "/" in participant or participant.startswith("."):
            raise DataError(f"bad participant name '{participant}'", hint="use names like server or site-0")
        return self.directory / f"{participant}.key.pem"

    def ensure(self, participants: Iterable[str]) -> None:
        """Load each participant's key, creating missing ones (never replacing a file that exists)."""
        with self._locked():
            for participant in participants:
                path = self._key_path(participant)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    self._keys[participant] = self._load_private(path)
                    continue
                key = generate_private_key(self.algorithm)
                pem = key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                with os.fdopen(fd, "wb") as handle:
                    handle.write(pem)
                self._keys[participant] = key

    @staticmethod
    def _load_private(path: Path) -> PrivateKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"unreadable private key ({exc})", where=str(path), hint="delete it to create a new one") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise DataError("private key is neither Ed25519 nor ECDSA", where=str(path))
        return key

    def anchor_document(self, participants: Iterable[str]) -> dict:
        """The ``public-keys.json`` document (public keys and fingerprints) of ``participants``."""
        document: dict = {"format": KEYS_FORMAT, "keys": {}}
        for participant in sorted(participants):
            public = self.public(participant)
            document["keys"][participant] = {
                "algorithm": algorithm_of(public),
                "public_key_pem": public_pem(public),
                "fingerprint": fingerprint(public),
            }
        return document

    def write_anchor(self, path: Path, participants: Iterable[str]) -> None:
        """Write the trust anchor of ``participants`` to ``path``; an existing file must already say the same."""
        text = json.dumps(self.anchor_document(participants), indent=1, sort_keys=True) + "\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if path.read_text(encoding="utf-8", errors="replace") != text:
                raise DataError(
                    "a different public-keys file is already there; it is not overwritten",
                    where=str(path),
                    hint="write the run to a new directory",
                ) from None
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(text)

    def private(self, participant: str) -> PrivateKey:
        try:
            return self._keys[participant]
        except KeyError:
            raise DataError(f"no signing key for writer '{participant}'", hint="open the ledger with every participant") from None

    def public(self, participant: str) -> PublicKey:
        return self.private(participant).public_key()
