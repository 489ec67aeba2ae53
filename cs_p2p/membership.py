"""How this node proves membership, in whichever mode the operator chose, as the pieces the
DHT, the peer server and the fetcher need: a datagram sealer, a request MAC and TLS contexts.

- token mode (`cluster-token-file`): datagrams and peer requests carry MACs under keys derived
  from the token (`auth`); peer transfers run over TLS with a certificate every holder of the
  token derives identically from it, so both ends of a connection prove they hold the token.
- key-pair mode (`node-key-file`, `node-cert-file`, `cluster-ca-file`): datagrams and records
  are signed by the node's key (`identity`); peer transfers are mutual TLS with the node's
  CA-signed certificate.
- neither: an open cluster (development, or a network that is itself trusted).
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from .auth import Sealer, derive, load_tokens
from .identity import Identity, KeySealer, key_ids, write_atomically, write_cert, write_private


@dataclass
class Membership:
    dht_sealer: Sealer | KeySealer | None = None
    peer_sealer: Sealer | None = None  # MACs of peer request lines (token mode)
    identity: Identity | None = None
    server_tls: ssl.SSLContext | None = None
    client_tls: ssl.SSLContext | None = None


def membership(token_file: str = "", key_file: str = "", cert_file: str = "", ca_file: str = "",
               tls_dir: str = "") -> Membership:
    """The membership a node's settings describe; `tls_dir` holds token mode's derived TLS
    files (without it, no TLS contexts: enough for operator commands)."""
    if token_file:
        tokens = load_tokens(token_file)
        member = Membership(Sealer(tokens, "dht"), Sealer(tokens, "peer"))
        if tls_dir:  # a daemon; operator commands only talk to the DHT
            cert, key = token_tls_files(tokens, tls_dir)
            member.server_tls, member.client_tls = tls_contexts(cert, key, trusted=_token_bundle(tokens, tls_dir))
        return member
    if key_file or cert_file or ca_file:
        identity = Identity.load(key_file, cert_file, ca_file)
        return Membership(KeySealer(identity, "dht"), None, identity, *tls_contexts(cert_file, key_file, ca_file))
    return Membership()


def tls_contexts(cert: str, key: str, trusted: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts for mutual TLS between members.  Peers are addressed by IP
    and identified by certificate, not by host name."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # Ed25519 certificates need TLS 1.3
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(trusted)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return server, client


def _token_cert(token: bytes) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """The same key and self-signed certificate on every node that holds `token` (Ed25519
    signatures are deterministic, and every field is fixed).  Name, serial and key ids follow
    from the key: during a rotation the bundle holds two of these, and OpenSSL must be able
    to tell them apart (with one shared name it tries the first and fails on its signature)."""
    key = Ed25519PrivateKey.from_private_bytes(derive(token, "tls"))
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cs-p2p cluster (token) {key_id.hex()[:16]}")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(int.from_bytes(key_id[:16], "big") >> 1 or 1)
               .not_valid_before(datetime.datetime(2020, 1, 1))
               .not_valid_after(datetime.datetime(2199, 12, 31))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    return key, key_ids(builder, key.public_key(), key.public_key()).sign(key, None)


def token_tls_files(tokens: list[bytes], tls_dir: str) -> tuple[str, str]:
    """Certificate and key files of the first token (what this node presents)."""
    key, cert = _token_cert(tokens[0])
    cert_path, key_path = os.path.join(tls_dir, "token.crt"), os.path.join(tls_dir, "token.key")
    write_private(key_path, key)
    write_cert(cert_path, cert)
    return cert_path, key_path


def _token_bundle(tokens: list[bytes], tls_dir: str) -> str:
    """The certificates of every token in the file (rotation: accept any)."""
    path = os.path.join(tls_dir, "token-trusted.crt")
    pems = [_token_cert(t)[1].public_bytes(serialization.Encoding.PEM) for t in tokens]
    write_atomically(path, b"".join(pems), 0o644)
    return path
