"""Parsers of everything a peer, a client or the network can send, fuzzed for a bounded time:
no input may crash them or escape as anything but their documented error."""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request

import pytest
import umsgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kademlia.node import Node

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cs_p2p.auth import AuthError, Sealer
from cs_p2p.identity import Identity, KeySealer, TrustStore, issue, make_ca
from cs_p2p.dht.protocol import ProviderProtocol
from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.dht.tags import TagRecord
from cs_p2p_dev.processes import CsP2P, free_port
from cs_p2p.errors import InvalidArgument
from cs_p2p.filters import parse_filters
from cs_p2p.service.wire import DecodeError, decode_write_request

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SOME = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

def _values(low: int, high: int):
    return st.recursive(
        st.none() | st.booleans() | st.integers(low, high) | st.floats() | st.text(max_size=40)
        | st.binary(max_size=40),
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    )


values = _values(-2**70, 2**70)
packable = _values(-2**63, 2**64 - 1)  # what msgpack can carry


@FUZZ
@given(values)
def test_record_parsers_accept_or_raise_value_error(value):
    for parse in (ProviderRecord.from_wire, TagRecord.from_wire):
        try:
            parse(value)
        except ValueError:
            pass


def _protocol() -> ProviderProtocol:
    return ProviderProtocol(Node(os.urandom(20), "127.0.0.1", 1), {}, 20)


@FUZZ
@given(st.sampled_from(["add_provider", "remove_provider", "get_providers", "add_tag", "get_tags"]),
       st.lists(values, max_size=5))
def test_our_rpc_handlers_always_reply(name, args):
    """A raising handler means no reply and a caller stuck for its whole timeout."""
    proto = _protocol()
    try:
        reply = getattr(proto, f"rpc_{name}")(("127.0.0.1", 9), *args)
    except TypeError:
        return  # wrong number of arguments: rpcudp's own dispatch, dropped below
    assert reply is True or isinstance(reply, dict)


@FUZZ
@given(st.binary(max_size=600) | st.builds(
    lambda kind, mid, name, args: kind + mid + umsgpack.packb([name, args]),
    st.sampled_from([b"\x00", b"\x01", b"\x02"]), st.binary(min_size=20, max_size=20),
    st.sampled_from(["ping", "store", "find_node", "find_value", "add_provider", "get_providers", "add_tag", "x"]),
    st.lists(packable, max_size=4)))
def test_any_datagram_is_handled_or_dropped(loop, data):
    """Each datagram is answered (one reply to its message id) or counted as dropped — never
    both, never neither — and nothing it starts ends in an exception nobody retrieved."""
    proto = _protocol()
    sent: list[bytes] = []
    errors: list[dict] = []

    class Sink:
        def sendto(self, data, addr=None):
            sent.append(data)

        def get_extra_info(self, name, default=None):
            return default  # no socket: sends as on an IPv4 one

    proto.connection_made(Sink())
    loop.set_exception_handler(lambda _, context: errors.append(context))

    async def run() -> None:
        await proto._solve_safely(data, ("127.0.0.1", 9))
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:  # e.g. the ping that checks a new sender: not waited for here
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    loop.run_until_complete(run())
    replies = [d for d in sent if d[:1] == b"\x01" and d[1:21] == data[1:21]]
    assert (len(replies) == 1) != (proto.dropped == 1), (replies, proto.dropped)
    assert len(replies) <= 1 and proto.dropped <= 1
    assert errors == []


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@FUZZ
@given(st.binary(max_size=200))
def test_sealed_datagrams_open_or_raise_auth_error(data):
    try:
        Sealer(b"a token that is long enough", "dht").open(data)
    except AuthError:
        pass


_CA_KEY, _CA = make_ca()
_KEY = Ed25519PrivateKey.generate()
_KEY_SEALER = KeySealer(Identity(_KEY, issue(_CA_KEY, _CA, _KEY.public_key()), TrustStore([_CA])), "dht")
_GENUINE = _KEY_SEALER.seal(b"\x00" + b"m" * 20 + umsgpack.packb(["ping", [b"n" * 20]]))


@FUZZ
@given(st.binary(max_size=600), st.integers(0, len(_GENUINE) - 1), st.integers(0, 255))
def test_signed_datagrams_open_or_raise_auth_error(data, at, byte):
    """Random bytes, and a genuine datagram with one byte changed (the certificate, the
    length, the time or the signature): never anything but AuthError."""
    mutated = bytearray(_GENUINE)
    mutated[at] = byte
    for candidate in (data, bytes(mutated)):
        try:
            _KEY_SEALER.unseal(candidate)
        except AuthError:
            pass


def test_every_one_byte_change_of_a_signed_datagram_is_refused():
    """Exhaustively over positions (the certificate's parser fails in many ways): each
    changed datagram raises AuthError and nothing else."""
    for at in range(len(_GENUINE)):
        for byte in {0, 1, 0xFF, _GENUINE[at] ^ 0x01} - {_GENUINE[at]}:
            mutated = bytearray(_GENUINE)
            mutated[at] = byte
            with pytest.raises(AuthError):
                _KEY_SEALER.unseal(bytes(mutated))


@FUZZ
@given(st.binary(max_size=300))
def test_write_request_decoder(data):
    try:
        decode_write_request(data)
    except (DecodeError, UnicodeDecodeError):
        pass


@FUZZ
@given(st.lists(st.text(max_size=60), max_size=3))
def test_filter_parser(filters):
    try:
        parse_filters(filters)
    except InvalidArgument:
        pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    peer, mirror = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cs = CsP2P(str(tmp_path_factory.mktemp("fuzz") / "cs"), [
        "--peer-listen", peer, "--mirror-listen", mirror, "--mirror-registry", f"http://127.0.0.1:{free_port()}",
        "--mirror-timeout-ms", "200"]).start()
    yield peer, mirror
    cs.stop()


_paths = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:/._-%?=&@", max_size=120)


@SOME
@given(_paths, st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST"]), st.text(max_size=40))
def test_http_servers_answer_garbage_with_client_errors(servers, path, method, range_header):
    for base, prefix in ((servers[0], "/blobs/"), (servers[1], "/v2/")):
        headers = {"Range": range_header} if range_header.isascii() else {}
        req = urllib.request.Request(f"http://{base}{prefix}{path}", method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, ValueError):
            continue  # a URL the client itself refuses to send
        assert status < 500, (base, method, path, range_header)
