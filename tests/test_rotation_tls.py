"""Rotation over the TLS peer transport: members mid-rotation (token files in either order, CA
bundles with the old and the new CA) complete mutual TLS handshakes with each other, in both
directions, with the certificates `cs-p2p ca` and token mode really make."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cs_p2p.identity import issue, make_ca, write_cert, write_private
from cs_p2p.membership import membership, tls_contexts

OLD, NEW = b"old cluster token, 32 bytes long", b"new cluster token, 32 bytes long"


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """A mutual TLS handshake between two members on loopback; raises ssl.SSLError if either
    end refuses the other."""
    done = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        done.set_result(True)

    srv = await asyncio.start_server(accepted, "127.0.0.1", 0, ssl=server)
    try:
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        assert await reader.read() == b"ok"
        writer.close()
        await asyncio.wait_for(done, 5)
    finally:
        srv.close()


def token_member(tmp_path, name: str, *tokens: bytes):
    path = tmp_path / f"{name}.token"
    path.write_bytes(b"\n".join(tokens) + b"\n")
    return membership(str(path), tls_dir=str(tmp_path / f"{name}-tls"))


@pytest.mark.parametrize("a_tokens,b_tokens", [
    ((OLD, NEW), (OLD,)),  # step 1 on one node
    ((NEW, OLD), (OLD, NEW)),  # step 2 on one node
    ((NEW,), (NEW, OLD)),  # step 3 on one node
])
async def test_token_rotation_steps_handshake_both_ways(tmp_path, a_tokens, b_tokens):
    a, b = token_member(tmp_path, "a", *a_tokens), token_member(tmp_path, "b", *b_tokens)
    await handshake(a.server_tls, b.client_tls)
    await handshake(b.server_tls, a.client_tls)


async def test_members_with_different_tokens_still_fail_the_handshake(tmp_path):
    a, b = token_member(tmp_path, "a", OLD), token_member(tmp_path, "b", NEW)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(a.server_tls, b.client_tls)


def ca_member(tmp_path, name: str, ca_key, ca_cert, bundle: str):
    key = Ed25519PrivateKey.generate()
    key_path, cert_path = str(tmp_path / f"{name}.key"), str(tmp_path / f"{name}.crt")
    write_private(key_path, key)
    write_cert(cert_path, issue(ca_key, ca_cert, key.public_key()))
    return tls_contexts(cert_path, key_path, bundle)


@pytest.mark.parametrize("order", ["old-first", "new-first"])
async def test_ca_rotation_members_of_either_ca_handshake_both_ways(tmp_path, order):
    (old_key, old_ca), (new_key, new_ca) = make_ca(), make_ca()  # the names `cs-p2p ca init` gives
    assert old_ca.subject != new_ca.subject
    bundle = tmp_path / "ca.crt"
    cas = [old_ca, new_ca] if order == "old-first" else [new_ca, old_ca]
    bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas))
    a_server, a_client = ca_member(tmp_path, "a", old_key, old_ca, str(bundle))
    b_server, b_client = ca_member(tmp_path, "b", new_key, new_ca, str(bundle))
    await handshake(a_server, b_client)
    await handshake(b_server, a_client)


def test_certificates_carry_key_identifiers_and_tokens_get_their_own_names(tmp_path):
    ca_key, ca = make_ca()
    member = issue(ca_key, ca, Ed25519PrivateKey.generate().public_key())
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert member.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    certs = []
    for token in (OLD, NEW):
        m = token_member(tmp_path, token[:3].decode(), token)
        del m
        pem = open(os.path.join(tmp_path, f"{token[:3].decode()}-tls", "token.crt"), "rb").read()
        certs.append(x509.load_pem_x509_certificate(pem))
    assert certs[0].subject != certs[1].subject and certs[0].serial_number != certs[1].serial_number
    again = token_member(tmp_path, "again", OLD)
    del again
    assert open(tmp_path / "again-tls" / "token.crt", "rb").read() == open(tmp_path / "old-tls" / "token.crt", "rb").read()
