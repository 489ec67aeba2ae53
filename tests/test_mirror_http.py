"""The registry mirror's HTTP surface, against a real registry upstream: what containerd (or
any OCI client) sees for good and bad requests."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request

import pytest

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import CsP2P, free_port
from tests.conftest import HAVE_CONTAINERD

ACCEPT = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    img = build_image(str(tmp_path_factory.mktemp("oci")), [300_000])
    push_image(img, registry.addr, "mirror/http")
    return img


@pytest.fixture
def mirror(workdir, registry):
    addr = f"127.0.0.1:{free_port()}"
    cs = CsP2P(os.path.join(workdir, "cs"), ["--mirror-listen", addr, "--mirror-registry", f"http://{registry.addr}"])
    cs.start()
    yield f"http://{addr}", registry.addr
    cs.stop()


def call(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def test_base_endpoint_answers_like_a_registry(mirror):
    base, _ = mirror
    status, headers, _ = call(f"{base}/v2/")
    assert status == 200 and headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_manifest_by_tag_and_by_digest_carry_digest_type_and_length(mirror, pushed):
    base, ns = mirror
    for ref in ("v1", pushed.manifest_digest):
        status, headers, body = call(f"{base}/v2/mirror/http/manifests/{ref}?ns={ns}", headers={"Accept": ACCEPT})
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == pushed.manifest_digest
        assert headers["Docker-Content-Digest"] == pushed.manifest_digest
        assert headers["Content-Type"] == ACCEPT and headers["Content-Length"] == str(len(body))
        status, head_headers, head_body = call(f"{base}/v2/mirror/http/manifests/{ref}?ns={ns}", "HEAD",
                                               {"Accept": ACCEPT})
        assert status == 200 and head_body == b""
        assert head_headers["Content-Length"] == str(len(body))
        assert head_headers["Docker-Content-Digest"] == pushed.manifest_digest


def test_blob_with_range(mirror, pushed):
    base, ns = mirror
    layer = pushed.layer_digests[0]
    data = pushed.blob_bytes(layer)
    status, headers, body = call(f"{base}/v2/mirror/http/blobs/{layer}?ns={ns}", headers={"Range": "bytes=10-99"})
    assert status == 206 and body == data[10:100]
    assert headers["Docker-Content-Digest"] == layer
    status, headers, body = call(f"{base}/v2/mirror/http/blobs/{layer}?ns={ns}")
    assert status == 200 and body == data


@pytest.mark.parametrize("path, method, status, code", [
    ("/v2/mirror/http/manifests/v1", "PUT", 405, "UNSUPPORTED"),
    ("/v2/mirror/http/blobs/uploads", "POST", 405, "UNSUPPORTED"),
    ("/v2/Bad..Name/manifests/v1", "GET", 400, "NAME_INVALID"),
    ("/v2/mirror/http/manifests/no-such-tag", "GET", 404, "MANIFEST_UNKNOWN"),
    ("/v2/mirror/http/manifests/bad%20tag!", "GET", 400, "MANIFEST_INVALID"),
    ("/v2/mirror/http/blobs/sha256:" + "0" * 64, "GET", 404, "BLOB_UNKNOWN"),
    ("/v2/mirror/http/blobs/sha256:xyz", "GET", 400, "DIGEST_INVALID"),
])
def test_bad_requests_get_oci_errors(mirror, pushed, path, method, status, code):
    base, ns = mirror
    got, headers, body = call(f"{base}{path}?ns={ns}", method)
    assert (got, error_code(body)) == (status, code)
    assert headers["Content-Type"].startswith("application/json")


def test_a_registry_that_is_not_mirrored_is_refused(mirror, pushed):
    base, _ = mirror
    status, _, body = call(f"{base}/v2/mirror/http/manifests/v1?ns=elsewhere.example:5000")
    assert (status, error_code(body)) == (404, "NAME_UNKNOWN")


class LyingRegistry:
    """An upstream that answers with bytes that do not match the digests asked for."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = b"not what you asked for" * 1000
                self.send_response(200)
                if "/manifests/" in self.path:
                    self.send_header("Content-Type", ACCEPT)
                    self.send_header("Docker-Content-Digest", "sha256:" + "ab" * 32)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self):  # noqa: N802  (it claims to have everything: access checks pass)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_upstream_bytes_that_do_not_match_their_digest_are_never_served_whole(workdir):
    import http.client

    liar = LyingRegistry()
    addr = f"127.0.0.1:{free_port()}"
    cs = CsP2P(os.path.join(workdir, "cs"), ["--mirror-listen", addr, "--mirror-registry", f"http://{liar.addr}"])
    cs.start()
    try:
        digest = "sha256:" + "cd" * 32
        for ref in ("v1", digest):
            status, _, body = call(f"http://{addr}/v2/x/manifests/{ref}?ns={liar.addr}")
            assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
        with urllib.request.urlopen(f"http://{addr}/v2/x/blobs/{digest}?ns={liar.addr}", timeout=30) as r:
            with pytest.raises(http.client.IncompleteRead):
                r.read()  # cut short before its last bytes: no client takes it as complete
        status, _, body = call(f"http://{addr}/v2/x/blobs/{digest}?ns={liar.addr}", headers={"Range": "bytes=0-9"})
        assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")
    finally:
        cs.stop()
        liar.close()


def test_a_manifest_that_arrives_in_pieces_is_read_whole(workdir):
    """A large manifest (many layers) comes in several TCP reads: the mirror reads to its end
    (it took the first read for the body, and the digest check then refused a good manifest)."""
    import hashlib
    import http.server
    import json
    import threading
    import time

    manifest = json.dumps({"schemaVersion": 2, "mediaType": ACCEPT, "config": {"digest": "sha256:" + "c" * 64},
                           "layers": [{"digest": "sha256:%064x" % i, "size": 4096} for i in range(300)]}).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", ACCEPT)
            self.send_header("Docker-Content-Digest", digest)
            self.send_header("Content-Length", str(len(manifest)))
            self.end_headers()
            self.wfile.write(manifest[:1000])
            self.wfile.flush()
            time.sleep(0.2)  # the rest later, as a slow link delivers it
            self.wfile.write(manifest[1000:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream = f"127.0.0.1:{server.server_address[1]}"
    addr = f"127.0.0.1:{free_port()}"
    cs = CsP2P(os.path.join(workdir, "cs"), ["--mirror-listen", addr, "--mirror-registry", f"http://{upstream}"])
    cs.start()
    try:
        status, headers, body = call(f"http://{addr}/v2/x/manifests/v1?ns={upstream}", headers={"Accept": ACCEPT})
        assert status == 200 and body == manifest and headers["Docker-Content-Digest"] == digest
    finally:
        cs.stop()
        server.shutdown()


def _https_registry_cert(d: str) -> tuple[str, str, str]:
    """A private CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test registry CA")).issuer_name(name("test registry CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(d, n) for n in ("ca.crt", "registry.crt", "registry.key"))
    for path, data in zip(paths, (ca.public_bytes(serialization.Encoding.PEM),
                                  cert.public_bytes(serialization.Encoding.PEM),
                                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))):
        with open(path, "wb") as f:
            f.write(data)
    return paths  # type: ignore[return-value]


def test_an_https_upstream_is_verified_against_its_configured_ca(workdir, tmp_path):
    from cs_p2p_dev.processes import Registry

    if not HAVE_CONTAINERD:
        pytest.skip("needs docker-registry (hack/install-deps.sh)")
    ca, cert, key = _https_registry_cert(str(tmp_path))
    reg = Registry(os.path.join(workdir, "reg"), tls=(cert, key)).start()
    nodes = []
    try:
        img = build_image(str(tmp_path / "oci"), [50_000])
        push_image(img, reg.addr, "tls/app")
        for name, extra in (("trusting", f', ca-file = "{ca}"'), ("default", "")):
            addr = f"127.0.0.1:{free_port()}"
            conf = os.path.join(workdir, f"{name}.toml")
            with open(conf, "w") as f:
                f.write(f'[mirror]\nlisten = "{addr}"\nregistries = [{{ url = "https://{reg.addr}"{extra} }}]\n')
            nodes.append(CsP2P(os.path.join(workdir, name), ["--config", conf]).start())
            status, headers, _ = call(f"http://{addr}/v2/tls/app/manifests/{img.tag}?ns={reg.addr}",
                                      headers={"Accept": ACCEPT + ", application/vnd.oci.image.index.v1+json"})
            if name == "trusting":
                assert status == 200 and headers["Docker-Content-Digest"].startswith("sha256:")
            else:  # the system's CAs do not know this registry's: never talked to unverified
                assert status == 404
    finally:
        for cs in nodes:
            cs.stop()
        reg.stop()
