"""The mirror's access records (`mirror.access.Grants`): what a registry's yes allows, for how
long, and what an outage allows."""

from __future__ import annotations

import json
import os
import time

from cs_p2p.mirror.access import ANONYMOUS, NODE, Grants

H, R, OTHER = "reg.example", "team-a/secret", "team-b/app"
M, L1, L2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64


def grants(tmp_path, **kw) -> Grants:
    return Grants(str(tmp_path / "access"), references=lambda m: {L1} if m == M else set(), **kw)


def test_credentials_are_kept_only_as_a_keyed_hash(tmp_path):
    g = grants(tmp_path)
    alice = g.who("Basic YWxpY2U6czNjcmV0", node_credentials=False)
    assert alice not in (ANONYMOUS, NODE) and alice == g.who("Basic YWxpY2U6czNjcmV0", False)
    assert g.who(None, False) == ANONYMOUS and g.who(None, True) == NODE
    g.confirm(alice, H, R, M)
    saved = open(tmp_path / "access" / "grants.json").read()
    assert "YWxpY2U6czNjcmV0" not in saved and alice in saved
    assert oct(os.stat(tmp_path / "access" / "key").st_mode & 0o777) == "0o600"
    other_node = Grants(str(tmp_path / "elsewhere"))
    assert other_node.who("Basic YWxpY2U6czNjcmV0", False) != alice  # keyed per node: no rainbow table


def test_a_confirmed_manifest_confirms_what_it_names_for_those_credentials_and_that_repository_only(tmp_path):
    g = grants(tmp_path)
    alice, bob = g.who("Basic a", False), g.who("Basic b", False)
    g.confirm(alice, H, R, M)
    assert g.confirmed(alice, H, R, M) and g.confirmed(alice, H, R, L1)
    assert not g.confirmed(alice, H, R, L2)  # not named by the manifest
    assert not g.confirmed(bob, H, R, L1) and not g.confirmed(ANONYMOUS, H, R, L1)
    assert not g.confirmed(alice, H, OTHER, L1)  # no cross-repository reads


def test_confirmations_expire(tmp_path):
    g = grants(tmp_path, confirm_ttl=0.05)
    g.confirm(NODE, H, R, M)
    deadline = time.monotonic() + 5
    while g.confirmed(NODE, H, R, M):
        assert time.monotonic() < deadline
    assert not g.confirmed(NODE, H, R, L1)


def test_an_outage_serves_accepted_credentials_and_public_repositories_within_the_window(tmp_path):
    g = grants(tmp_path, outage_window=3600)
    alice, bob = g.who("Basic a", False), g.who("Basic b", False)
    g.confirm(alice, H, R, M)
    assert g.outage_refusal(alice, H, R, M) is None
    assert g.outage_refusal(alice, H, R, L1) is None  # named by a manifest recorded in R
    assert g.outage_refusal(bob, H, R, M) == "outage_unknown_credentials"
    assert g.outage_refusal(ANONYMOUS, H, R, M) == "outage_unknown_credentials"
    assert g.outage_refusal(alice, H, OTHER, M) == "outage_not_in_repository"
    assert g.outage_refusal(alice, H, R, L2) == "outage_not_in_repository"
    g.note_record(H, "pub/app", L2, time.time(), public=True)  # a member resolved it anonymously
    assert g.outage_refusal(bob, H, "pub/app", L2) is None
    assert g.outage_refusal(ANONYMOUS, H, "pub/app", L2) is None
    assert g.outage_refusal(ANONYMOUS, H, "pub/app", M) == "outage_not_in_repository"


def test_outage_records_survive_a_restart_and_age_out(tmp_path):
    g = grants(tmp_path, outage_window=3600)
    alice = g.who("Basic a", False)
    g.confirm(alice, H, R, M)
    again = grants(tmp_path, outage_window=3600)
    assert again.who("Basic a", False) == alice and again.outage_refusal(alice, H, R, M) is None
    path = tmp_path / "access" / "grants.json"
    doc = json.loads(path.read_text())
    doc["accepted"] = [[w, h, r, at - 7200] for w, h, r, at in doc["accepted"]]  # accepted two hours ago
    path.write_text(json.dumps(doc))
    stale = grants(tmp_path, outage_window=3600)
    assert stale.outage_refusal(alice, H, R, M) == "outage_unknown_credentials"
