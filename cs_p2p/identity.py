"""Membership by per-node key pairs: each node holds an Ed25519 key and an X.509 certificate
for it, signed by the cluster's CA; a node is a member iff its certificate verifies under one
of the CA certificates the node trusts.

Unlike a shared token, a key tells members apart.  A node's DHT id is derived from its public
key (`node_id_of`), so every datagram, provider record and tag record signed by that key can
only speak for that node: nobody announces, withdraws or publishes a tag in another's name,
and a node that stores records cannot alter them unnoticed.  The same key and certificate
authenticate peer transfers as mutual TLS (`tls`).

Rotation without downtime: the CA file may hold several CA certificates (old and new); a node
key is rotated by issuing a new certificate and restarting the node (its id changes with its
key; its old records expire or are withdrawn).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .auth import AuthError, ReplayGuard

SIG_LEN = 64
_TRAILER = struct.Struct("!HQQ")  # certificate length, time in ms, nonce
MAX_CERT_BYTES = 2048
_CACHE = 10_000  # verified certificates remembered


class IdentityError(Exception):
    pass


def node_id_of(public_raw: bytes) -> bytes:
    """The 20-byte DHT id that belongs to a public key."""
    return hashlib.sha1(b"cs-p2p/node/" + public_raw).digest()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def write_private(path: str, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomically(path, pem, 0o600)


def write_cert(path: str, cert: x509.Certificate) -> None:
    write_atomically(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """Readers see the old file or the new one, never a part; a key is never readable by others."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_private(path: str) -> Ed25519PrivateKey:
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"cannot load node key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"node key {path} is not an Ed25519 key")
    return key


def load_certs(path: str, what: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot load {what} {path}: {exc}") from None
    return certs


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def key_ids(builder: x509.CertificateBuilder, subject: Ed25519PublicKey,
            issuer: Ed25519PublicKey) -> x509.CertificateBuilder:
    """Subject and authority key identifiers.  A trust bundle may hold several CAs (rotation):
    OpenSSL picks the issuer among them by these identifiers and by name, and without them it
    tries the first certificate whose name matches and fails on its signature."""
    return (builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer), critical=False))


def make_ca(common_name: str = "", days: int = 3650) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A cluster CA.  Its default name carries its key id, so the old and the new CA of a
    rotation never share a subject."""
    key = Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.timezone.utc)
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:16]
    name = _name(common_name or f"cs-p2p cluster CA {key_id}")
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True))
    return key, key_ids(builder, key.public_key(), key.public_key()).sign(key, None)


def issue(ca_key: Ed25519PrivateKey, ca_cert: x509.Certificate, public: Ed25519PublicKey,
          days: int = 365, not_before: datetime.datetime | None = None) -> x509.Certificate:
    """A member certificate for `public`; its common name is the node id the key implies."""
    now = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(_name(node_id_of(_raw(public)).hex()))
               .issuer_name(ca_cert.subject).public_key(public).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    return key_ids(builder, public, ca_key.public_key()).sign(ca_key, None)


@dataclass(frozen=True)
class Member:
    """A node whose certificate verified: who signed a datagram or a record."""

    node_id: bytes
    public: Ed25519PublicKey
    cert_der: bytes

    def verify(self, data: bytes, sig: bytes) -> bool:
        try:
            self.public.verify(sig, data)
            return True
        except InvalidSignature:
            return False


class TrustStore:
    """The CA certificates a node trusts; member certificates are checked once and remembered."""

    def __init__(self, cas: list[x509.Certificate]) -> None:
        if not cas:
            raise IdentityError("no CA certificate to trust")
        self.cas = cas
        self._known: dict[bytes, tuple[Member, float]] = {}  # der -> member, valid until

    def member(self, der: bytes, now: float | None = None) -> Member:
        """The member a certificate names; IdentityError if no trusted CA issued it or it is
        not valid now."""
        now = time.time() if now is None else now
        hit = self._known.get(der)
        if hit is not None and hit[1] >= now:
            return hit[0]
        if len(der) > MAX_CERT_BYTES:
            raise IdentityError("certificate too large")
        try:  # fields are parsed lazily: any of them may turn out malformed
            cert = x509.load_der_x509_certificate(der)
            public = cert.public_key()
            not_before, not_after = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
            issued = any(self._issued_by(cert, ca) for ca in self.cas)
        except Exception:  # ValueError, InvalidVersion, UnsupportedAlgorithm...: untrusted bytes
            raise IdentityError("malformed certificate") from None
        if not isinstance(public, Ed25519PublicKey):
            raise IdentityError("member keys are Ed25519")
        if not (not_before <= now <= not_after):
            raise IdentityError("certificate expired or not yet valid")
        if not issued:
            raise IdentityError("certificate not issued by a trusted cluster CA")
        member = Member(node_id_of(_raw(public)), public, der)
        if len(self._known) >= _CACHE:
            self._known.clear()
        self._known[der] = (member, not_after)
        return member

    @staticmethod
    def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False


class Identity:
    """This node's key, certificate and trusted CAs."""

    def __init__(self, key: Ed25519PrivateKey, cert: x509.Certificate, trust: TrustStore) -> None:
        self.key = key
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.trust = trust
        self.node_id = node_id_of(_raw(key.public_key()))
        if _raw(cert.public_key()) != _raw(key.public_key()):  # type: ignore[arg-type]
            raise IdentityError("node certificate is for another key")
        try:
            trust.member(self.cert_der)
        except IdentityError as exc:
            raise IdentityError(f"this node's own certificate does not verify: {exc}") from None

    @classmethod
    def load(cls, key_file: str, cert_file: str, ca_file: str) -> "Identity":
        certs = load_certs(cert_file, "node certificate")
        if not certs:
            raise IdentityError(f"no certificate in {cert_file}")
        return cls(load_private(key_file), certs[0], TrustStore(load_certs(ca_file, "cluster CA")))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def ca_command(args) -> str:
    """`cs-p2p ca init DIR` / `cs-p2p ca issue DIR --key K --cert C`: what was written."""
    ca_key_path, ca_cert_path = os.path.join(args.dir, "ca.key"), os.path.join(args.dir, "ca.crt")
    if args.ca_command == "init":
        if os.path.exists(ca_key_path):
            raise IdentityError(f"{ca_key_path} exists: not overwriting a CA")
        key, cert = make_ca()
        write_private(ca_key_path, key)
        write_cert(ca_cert_path, cert)
        return f"wrote {ca_key_path} (keep it secret) and {ca_cert_path} (give it to every node)"
    ca_key, ca_cert = load_private(ca_key_path), load_certs(ca_cert_path, "CA certificate")[0]
    if not os.path.exists(args.key):
        write_private(args.key, Ed25519PrivateKey.generate())
    public = load_private(args.key).public_key()
    write_cert(args.cert, issue(ca_key, ca_cert, public, days=args.days))
    return f"wrote {args.cert} for node {node_id_of(_raw(public)).hex()}"


class KeySealer:
    """DHT datagrams signed by the sender's key, its certificate alongside: the receiver learns
    which member sent it (`unseal`).  Same interface as `auth.Sealer`."""

    def __init__(self, identity: Identity, purpose: str) -> None:
        self.identity = identity
        self._domain = b"cs-p2p/v1/" + purpose.encode() + b"/"
        self.replays = ReplayGuard()

    def seal(self, body: bytes) -> bytes:
        cert = self.identity.cert_der
        unsigned = body + cert + _TRAILER.pack(len(cert), int(time.time() * 1000),
                                               int.from_bytes(os.urandom(8), "big"))
        return unsigned + self.identity.sign(self._domain + unsigned)

    def unseal(self, sealed: bytes) -> tuple[bytes, Member]:
        """The body and its sender; AuthError if not from a member, forged, stale or replayed."""
        if len(sealed) < _TRAILER.size + SIG_LEN:
            raise AuthError("message too short")
        unsigned, sig = sealed[:-SIG_LEN], sealed[-SIG_LEN:]
        cert_len, stamp, nonce = _TRAILER.unpack(unsigned[-_TRAILER.size:])
        if cert_len > len(unsigned) - _TRAILER.size:
            raise AuthError("malformed message")
        end = len(unsigned) - _TRAILER.size
        body, cert = unsigned[: end - cert_len], unsigned[end - cert_len: end]
        try:
            member = self.identity.trust.member(cert)
        except IdentityError as exc:
            raise AuthError(str(exc)) from None
        if not member.verify(self._domain + unsigned, sig):
            raise AuthError("bad signature")
        if not self.replays.fresh(stamp, nonce):
            raise AuthError("stale or replayed message")
        return body, member

    def open(self, sealed: bytes) -> bytes:
        return self.unseal(sealed)[0]
