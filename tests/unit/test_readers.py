"""Which credentials cs-p2p may fetch a repository's blobs with on containerd's behalf, and
for how long."""

from __future__ import annotations

import base64
import json
import time

from cs_p2p.mirror.readers import Readers, token_expiry


def jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"Bearer {part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_a_reader_is_kept_for_the_ttl_and_never_past_its_tokens_expiry(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    readers = Readers(ttl=60)
    assert readers.current("r", "team/app") is None
    readers.accepted("r", "team/app", None)  # anonymous, or the node's own credentials
    assert readers.current("r", "team/app").authorization is None
    readers.accepted("r", "team/private", "Basic dTpw")
    assert readers.current("r", "team/private").authorization == "Basic dTpw"
    assert readers.current("r", "team/other") is None  # per repository
    now[0] += 61
    assert readers.current("r", "team/app") is None and readers.current("r", "team/private") is None

    short = jwt({"exp": time.time() + 5})
    readers.accepted("r", "team/app", short)
    assert readers.current("r", "team/app").authorization == short
    now[0] += 6
    assert readers.current("r", "team/app") is None  # the token said 5 s


def test_token_expiry_reads_a_bearer_jwt_only():
    assert token_expiry(jwt({"exp": 1234567890})) == 1234567890
    assert token_expiry(jwt({"sub": "x"})) is None
    assert token_expiry("Basic dTpw") is None and token_expiry("Bearer opaque") is None
    assert token_expiry("Bearer a.!!!.c") is None
