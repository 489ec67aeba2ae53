"""Membership by cluster token: outsiders and replays get nothing, members work as before."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

from cs_p2p.auth import HEADER, AuthError, Sealer, load_tokens
from cs_p2p.dht.node import provider_key
from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.membership import membership
from tests.conftest import assert_outsider_gets_nothing, assert_read_from_peers, commit_via_socket

TOKEN = b"correct horse battery staple 42"
D1 = "sha256:" + "11" * 32


def test_sealed_messages_open_once_and_only_under_the_same_token():
    a, b = Sealer(TOKEN, "dht"), Sealer(TOKEN, "dht")
    sealed = a.seal(b"hello")
    assert b.open(sealed) == b"hello"
    with pytest.raises(AuthError):
        b.open(sealed)  # replayed
    for other in (Sealer(b"another token of enough length", "dht"), Sealer(TOKEN, "peer")):
        with pytest.raises(AuthError):
            other.open(a.seal(b"hello"))  # another token, or the key of another use
    forged = bytearray(a.seal(b"hello"))
    forged[0] ^= 1
    with pytest.raises(AuthError):
        b.open(bytes(forged))
    with pytest.raises(AuthError):
        b.open(b"short")


def test_stale_messages_are_refused(monkeypatch):
    a, b = Sealer(TOKEN, "dht"), Sealer(TOKEN, "dht")
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0)
    sealed = a.seal(b"x")
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0 + 120)
    with pytest.raises(AuthError):
        b.open(sealed)


def test_token_files_must_hold_a_real_secret(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    for path in (short, tmp_path / "missing"):
        with pytest.raises(AuthError):
            load_tokens(str(path))
    good = tmp_path / "good"
    good.write_bytes(TOKEN + b"\n\n  another token, being rolled out\n")
    assert load_tokens(str(good)) == [TOKEN, b"another token, being rolled out"]


def test_rotation_seals_with_the_first_token_and_accepts_any():
    old, new = TOKEN, b"the next token, rolled out now"
    old_only, both, new_first, new_only = (Sealer(t, "dht") for t in ([old], [old, new], [new, old], [new]))
    assert both.open(old_only.seal(b"1")) == b"1"  # step 1: the new token added as a second line
    assert old_only.open(both.seal(b"2")) == b"2"
    assert both.open(new_first.seal(b"3")) == b"3"  # step 2: the new token moved first
    assert new_only.open(new_first.seal(b"4")) == b"4"  # step 3: the old one removed
    with pytest.raises(AuthError):
        old_only.open(new_only.seal(b"5"))


@pytest.fixture
def token_nodes(dht_nodes):
    """DHT nodes sealing with `token` (None: no token at all)."""
    return lambda token, bootstrap=None: dht_nodes(Sealer(token, "dht") if token else None, bootstrap)


async def test_outsiders_can_neither_join_announce_withdraw_nor_read(token_nodes):
    first = await token_nodes(TOKEN)
    members = [first] + [await token_nodes(TOKEN, first) for _ in range(2)]
    assert all(m.met for m in members[1:])
    await members[1].announce(D1, 7)
    for token in (None, b"a wrong token of sufficient size"):
        outsider = await token_nodes(token, first)
        assert outsider.met == 0  # nobody answers it
        assert await outsider.find_providers(D1) == []
        # it cannot add records, nor remove a member's
        key = provider_key(D1)
        ok, _ = await outsider.protocol.add_provider(("127.0.0.1", first.port), outsider.node_id, key,
                                                     ProviderRecord(outsider.node_id, "6.6.6.6:1", 7, time.time() + 60).to_wire())
        assert not ok
        ok, _ = await outsider.protocol.remove_provider(("127.0.0.1", first.port), members[1].node_id, key)
        assert not ok
        await outsider.announce(D1, 7)
        await outsider.publish_tag("r.example/app:v1", D1, "application/vnd.oci.image.manifest.v1+json", 10)
    found = await members[2].find_providers(D1)
    assert [r.addr for r in found] == [members[1].peer_addr]  # only the member's record
    assert await members[2].find_tag("r.example/app:v1") is None  # no poisoned tag
    assert first.protocol.dropped > 0


async def test_a_replayed_datagram_is_dropped(token_nodes):
    first = await token_nodes(TOKEN)
    member = await token_nodes(TOKEN, first)
    captured: list[bytes] = []
    real = member.protocol.transport._inner
    orig_sendto = real.sendto

    def capture(data, addr=None):
        captured.append(data)
        orig_sendto(data, addr)

    real.sendto = capture
    await member.announce(D1, 7)  # stored on `first`
    real.sendto = orig_sendto
    await member.withdraw(D1)
    assert first.protocol.providers.get(provider_key(D1)) == []
    dropped = first.protocol.dropped
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in captured:  # an attacker replays the announce
            s.sendto(datagram, ("127.0.0.1", first.port))
    deadline = time.monotonic() + 5
    while first.protocol.dropped < dropped + len(captured):
        assert time.monotonic() < deadline, "replays were not dropped"
        await asyncio.sleep(0.02)
    assert first.protocol.providers.get(provider_key(D1)) == []


@pytest.fixture
def token_pair(workdir, p2p_node):
    path = os.path.join(workdir, "token")
    with open(path, "wb") as f:
        f.write(TOKEN)

    def start(name: str, bootstrap: str | None = None, token: str | None = path):
        return p2p_node(name, ["--cluster-token-file", token] if token else [], bootstrap)

    yield start, path


def test_members_fetch_from_each_other_and_outsiders_get_no_blob(token_pair):
    start, token = token_pair
    a, a_peer, a_dht = start("a")
    b, _, _ = start("b", a_dht)
    data = os.urandom(200_000)
    digest = commit_via_socket(a, data)
    assert_read_from_peers(b, digest, data)
    # Peer transfers are TLS, and both ends must present the certificate derived from the token.
    member_tls = membership(token, tls_dir=os.path.join(os.path.dirname(token), "tls-test")).client_tls
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    url = f"https://{a_peer}/blobs/{digest}"

    def get(url: str, header: str | None, ctx) -> bytes:
        req = urllib.request.Request(url, headers={HEADER: header} if header else {})
        return urllib.request.urlopen(req, timeout=10, context=ctx).read()

    sealer = Sealer(TOKEN, "peer")
    for bad_url, ctx in ((f"http://{a_peer}/blobs/{digest}", None), (url, no_cert)):
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            get(bad_url, sealer.request_header("GET", f"/blobs/{digest}"), ctx)
    # Even over the members' TLS: no header, a forged one, one made with another token.
    for header in (None, "00" * 32, Sealer(b"wrong token, long enough", "peer").request_header("GET", f"/blobs/{digest}")):
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            get(url, header, member_tls)
    good = sealer.request_header("GET", f"/blobs/{digest}")
    assert get(url, good, member_tls) == data  # a member's request
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        get(url, good, member_tls)  # the same request replayed


def test_a_daemon_without_the_token_cannot_join_or_fetch(token_pair):
    start, _ = token_pair
    a, _, a_dht = start("a")
    data = os.urandom(50_000)
    digest = commit_via_socket(a, data)
    outsider, _, _ = start("x", a_dht, token=None)
    assert_outsider_gets_nothing(outsider, digest)
