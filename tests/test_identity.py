"""Membership by per-node key pairs signed by the cluster CA: only members talk, and a member
can speak only for itself — its datagrams, provider records and tag records are signed."""

from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request


import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kademlia.node import Node

from cs_p2p.auth import AuthError
from cs_p2p.dht.node import provider_key
from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.dht.tags import TagRecord, tag_key
from cs_p2p.membership import tls_contexts
from cs_p2p.identity import (Identity, IdentityError, KeySealer, TrustStore, issue, load_certs, make_ca, node_id_of,
                             write_cert, write_private)

D1 = "sha256:" + "11" * 32
from tests.conftest import assert_outsider_gets_nothing, assert_read_from_peers, commit_via_socket

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CA_KEY, CA = make_ca()


def member(ca_key=CA_KEY, ca=CA, trusted=None, **kw) -> Identity:
    key = Ed25519PrivateKey.generate()
    return Identity(key, issue(ca_key, ca, key.public_key(), **kw), TrustStore(trusted or [CA]))


def test_a_member_certificate_verifies_and_names_the_id_of_its_key():
    me = member()
    other_ca_key, other_ca = make_ca("another cluster")
    assert me.trust.member(me.cert_der).node_id == me.node_id
    outsider = Ed25519PrivateKey.generate()
    for ca_key, ca in ((other_ca_key, other_ca), (outsider, CA)):  # another CA; a forged issuer signature
        cert = issue(ca_key, ca, outsider.public_key())
        with pytest.raises(IdentityError):
            Identity(outsider, cert, TrustStore([CA]))
    expired = issue(CA_KEY, CA, outsider.public_key(), days=1,
                    not_before=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3))
    with pytest.raises(IdentityError, match="expired"):
        Identity(outsider, expired, TrustStore([CA]))
    with pytest.raises(IdentityError, match="another key"):
        Identity(Ed25519PrivateKey.generate(), issue(CA_KEY, CA, outsider.public_key()), TrustStore([CA]))


def test_datagrams_open_once_and_only_from_members():
    a, b = member(), member()
    sealed = KeySealer(a, "dht").seal(b"hello")
    reader = KeySealer(b, "dht")
    body, sender = reader.unseal(sealed)
    assert (body, sender.node_id) == (b"hello", a.node_id)
    with pytest.raises(AuthError):
        reader.unseal(sealed)  # replayed
    forged = bytearray(KeySealer(a, "dht").seal(b"hello"))
    forged[0] ^= 1
    for bad in (bytes(forged), b"", b"x" * 100, KeySealer(a, "peer").seal(b"hello")):
        with pytest.raises(AuthError):
            reader.unseal(bad)
    other_ca_key, other_ca = make_ca("another cluster")
    stranger = member(other_ca_key, other_ca, trusted=[other_ca])
    with pytest.raises(AuthError, match="trusted"):
        reader.unseal(KeySealer(stranger, "dht").seal(b"hello"))


def test_ca_rotation_trusts_members_of_either_ca_while_both_are_listed(tmp_path):
    new_key, new_ca = make_ca("next CA")
    old_member, new_member = member(), member(new_key, new_ca, trusted=[new_ca])
    both = TrustStore([CA, new_ca])
    assert both.member(old_member.cert_der).node_id == old_member.node_id
    assert both.member(new_member.cert_der).node_id == new_member.node_id
    bundle = tmp_path / "ca.pem"
    write_cert(str(bundle), CA)
    bundle.write_bytes(bundle.read_bytes() + new_ca.public_bytes(serialization.Encoding.PEM))
    assert len(load_certs(str(bundle), "cluster CA")) == 2
    key_path = tmp_path / "node.key"
    write_private(str(key_path), Ed25519PrivateKey.generate())
    assert os.stat(key_path).st_mode & 0o077 == 0  # the private key is the owner's alone
    with pytest.raises(IdentityError):
        Identity.load(str(key_path), str(tmp_path / "missing.crt"), str(bundle))


@pytest.fixture
def key_nodes(dht_nodes):
    """DHT nodes in key-pair mode: the id is the one the identity's key implies."""
    return lambda identity, bootstrap=None: dht_nodes(KeySealer(identity, "dht"), bootstrap, identity.node_id)


async def test_members_join_and_find_signed_records_and_outsiders_get_nothing(key_nodes):
    first = await key_nodes(member())
    members = [first] + [await key_nodes(member(), first) for _ in range(2)]
    assert all(m.met for m in members[1:])
    await members[1].announce(D1, 7)
    await members[1].publish_tag("r.example/app:v1", D1, MANIFEST, 10)
    other_ca_key, other_ca = make_ca("another cluster")
    outsider = await key_nodes(member(other_ca_key, other_ca, trusted=[other_ca]), first)
    assert outsider.met == 0
    await outsider.announce(D1, 7)
    assert await outsider.find_providers(D1) == []
    found = await members[2].find_providers(D1)
    assert [(r.addr, r.node_id) for r in found] == [(members[1].peer_addr, members[1].node_id)]
    tag = await members[2].find_tag("r.example/app:v1")
    assert (tag.digest, tag.node_id) == (D1, members[1].node_id)
    assert first.protocol.dropped > 0


async def test_an_operator_with_a_nodes_own_key_sees_that_node_and_its_records(key_nodes, capsys):
    """`cs-p2p locate`/`peers` run on a node with that node's key files: the client has the
    node's id, and must still list the node and the blobs it provides."""
    from cs_p2p.dht import operator
    from cs_p2p.membership import Membership

    first = await key_nodes(member())
    node_identity = member()
    node = await key_nodes(node_identity, first)
    await node.announce(D1, 7)
    on_the_node = Membership(dht_sealer=KeySealer(node_identity, "dht"), identity=node_identity)
    for via in (node, first):
        assert await operator.locate(D1, [f"127.0.0.1:{via.port}"], on_the_node) == 0
        assert node.peer_addr in capsys.readouterr().out
    assert await operator.peers([f"127.0.0.1:{node.port}"], on_the_node) == 0
    out = capsys.readouterr().out
    assert node.node_id.hex() in out and first.node_id.hex() in out


async def test_a_member_cannot_announce_withdraw_or_tag_for_another(key_nodes):
    first = await key_nodes(member())
    honest = await key_nodes(member(), first)
    rogue = await key_nodes(member(), first)
    await honest.announce(D1, 7)
    key = provider_key(D1)
    victim = honest.node_id
    # Claiming the honest node's id: the datagram is signed by the rogue's own key, so dropped.
    ok, _ = await rogue.protocol.remove_provider(("127.0.0.1", first.port), victim, key)
    assert not ok
    fake = ProviderRecord(victim, "6.6.6.6:1", 7, time.time() + 60)
    ok, _ = await rogue.protocol.add_provider(("127.0.0.1", first.port), victim, key, fake.to_wire())
    assert not ok
    # Under its own id, a record naming another node, or an unsigned or wrongly signed one, is refused.
    for rec in (fake, ProviderRecord(rogue.node_id, "6.6.6.6:1", 7, time.time() + 60),
                rogue.protocol.sign("provider", provider_key("sha256:" + "22" * 32),
                                    ProviderRecord(rogue.node_id, "6.6.6.6:1", 7, time.time() + 60))):
        ok, reply = await rogue.protocol.add_provider(("127.0.0.1", first.port), rogue.node_id, key, rec.to_wire())
        assert ok and "error" in reply
    tkey = tag_key("r.example/app:v1")
    forged_tag = TagRecord(victim, "sha256:" + "33" * 32, MANIFEST, 10, time.time())
    ok, reply = await rogue.protocol.add_tag(("127.0.0.1", first.port), rogue.node_id, tkey, forged_tag.to_wire())
    assert ok and "error" in reply
    assert [r.addr for r in first.protocol.providers.get(key)] == [honest.peer_addr]
    assert await first.find_tag("r.example/app:v1") is None
    # The honest node withdraws its own record.
    await honest.withdraw(D1)
    assert first.protocol.providers.get(key) == []


async def test_a_node_that_alters_records_it_stores_is_not_believed(key_nodes):
    first = await key_nodes(member())
    honest = await key_nodes(member(), first)
    reader = await key_nodes(member(), first)
    await honest.announce(D1, 7)
    key = provider_key(D1)
    reader.protocol.providers.remove(key, honest.node_id)  # the reader must ask `first`
    honest.protocol.providers.remove(key, honest.node_id)
    stored = first.protocol.providers.get(key)[0]
    # `first` (a member gone bad) points the record at its own address, keeping the signature.
    first.protocol.providers.add(key, ProviderRecord(stored.node_id, "6.6.6.6:1", stored.size, stored.expires,
                                                     stored.started, stored.sig))
    assert await reader.find_providers(D1) == []
    assert reader.protocol.forged >= 1
    first.protocol.providers.add(key, stored)  # the untouched record is believed again
    assert [r.addr for r in await reader.find_providers(D1)] == [honest.peer_addr]


def test_node_ids_follow_keys():
    key = Ed25519PrivateKey.generate()
    ident = Identity(key, issue(CA_KEY, CA, key.public_key()), TrustStore([CA]))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert ident.node_id == node_id_of(raw) and len(ident.node_id) == 20


@pytest.fixture
def key_cluster(workdir, p2p_node):
    """Daemons in key-pair mode: a CA made with `cs-p2p ca init`, node certificates with `ca issue`."""
    ca_dir = os.path.join(workdir, "ca")

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "cs_p2p.cli", *args], check=True, capture_output=True)

    cli("ca", "init", ca_dir)

    def start(name: str, bootstrap: str | None = None, ca: str = ca_dir):
        key, cert = os.path.join(workdir, f"{name}.key"), os.path.join(workdir, f"{name}.crt")
        cli("ca", "issue", ca, "--key", key, "--cert", cert)
        args = ["--node-key-file", key, "--node-cert-file", cert, "--cluster-ca-file", os.path.join(ca, "ca.crt")]
        return p2p_node(name, args, bootstrap) + (key, cert)

    return start, cli


def test_members_fetch_over_mutual_tls_and_outsiders_get_nothing(key_cluster, workdir):
    start, cli = key_cluster
    a, a_peer, a_dht, a_key, a_cert = start("a")
    b, _, _, _, _ = start("b", a_dht)
    data = os.urandom(300_000)
    digest = commit_via_socket(a, data)
    assert_read_from_peers(b, digest, data)
    # An operator with a certificate of its own locates the blob; without one it reaches nobody.
    op_key, op_cert = os.path.join(workdir, "op.key"), os.path.join(workdir, "op.crt")
    cli("ca", "issue", os.path.join(workdir, "ca"), "--key", op_key, "--cert", op_cert)
    locate = [sys.executable, "-m", "cs_p2p.cli", "locate", digest, "--bootstrap", a_dht]
    out = subprocess.run(locate + ["--node-key-file", op_key, "--node-cert-file", op_cert,
                                   "--cluster-ca-file", os.path.join(workdir, "ca", "ca.crt")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and a_peer in out.stdout, out.stderr
    assert subprocess.run(locate, capture_output=True, text=True, timeout=60).returncode != 0
    # The peer server speaks TLS only to holders of a member certificate.
    url = f"https://{a_peer}/blobs/{digest}"
    ca = os.path.join(workdir, "ca", "ca.crt")
    _, member_tls = tls_contexts(a_cert, a_key, ca)
    assert urllib.request.urlopen(url, timeout=10, context=member_tls).read() == data
    cli("ca", "init", os.path.join(workdir, "other-ca"))
    x_key, x_cert = os.path.join(workdir, "x.key"), os.path.join(workdir, "x.crt")
    cli("ca", "issue", os.path.join(workdir, "other-ca"), "--key", x_key, "--cert", x_cert)
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    stranger.check_hostname, stranger.verify_mode = False, ssl.CERT_NONE
    stranger.load_cert_chain(x_cert, x_key)
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    for ctx, u in ((stranger, url), (no_cert, url), (None, f"http://{a_peer}/blobs/{digest}")):
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(u, timeout=10, context=ctx).read()
    # A daemon whose certificate another CA issued neither joins nor finds a's blob.
    outsider, _, _, _, _ = start("y", a_dht, ca=os.path.join(workdir, "other-ca"))
    assert_outsider_gets_nothing(outsider, digest)


async def test_records_handed_over_keep_their_publishers_signatures(key_nodes):
    """A node handing a key's records to a newcomer (Kademlia's join, `ProviderProtocol._hand_over`)
    cannot slip in a record it altered: the newcomer keeps only records their publishers signed."""
    first = await key_nodes(member())
    honest = await key_nodes(member(), first)
    await honest.announce(D1, 7)
    key = provider_key(D1)
    stored = first.protocol.providers.get(key)[0]
    altered = ProviderRecord(stored.node_id, "6.6.6.6:1", stored.size, stored.expires, stored.started, stored.sig)
    newcomer = await key_nodes(member(), first)
    to = Node(newcomer.node_id, "127.0.0.1", newcomer.server.transport.get_extra_info("sockname")[1])
    assert await first.protocol.call_hand_over(to, key, [altered], D1)
    assert newcomer.protocol.providers.get(key) in ([], [stored])  # never the altered one
    assert newcomer.protocol.forged >= 1
    assert await first.protocol.call_hand_over(to, key, [stored], D1)
    assert newcomer.protocol.providers.get(key) == [stored]
    assert newcomer.protocol.digests[key] == D1
