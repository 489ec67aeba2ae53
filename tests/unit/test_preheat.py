"""What `cs-p2p preheat` accepts and prints, without a cluster."""

from __future__ import annotations

import pytest

from cs_p2p.errors import InvalidArgument
from cs_p2p.placement.preheat import parse_ref, platform_matches
from cs_p2p.placement.preheat_client import describe, human

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("ref, parsed", [
    ("127.0.0.1:5000/team/app:v1", ("127.0.0.1:5000", "team/app", "v1")),
    ("registry.example/app", ("registry.example", "app", "latest")),
    (f"registry.example/app@{D}", ("registry.example", "app", D)),
    (D, ("", "", D)),
])
def test_references_name_registry_repository_and_tag_or_digest(ref, parsed):
    assert parse_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["app", "registry.example/", "sha256:xyz", "registry.example/app@sha256:12"])
def test_bad_references_are_refused(ref):
    with pytest.raises(InvalidArgument):
        parse_ref(ref)


def test_platforms_match_os_arch_and_variant():
    arm = {"platform": {"os": "linux", "architecture": "arm", "variant": "v7"}}
    assert platform_matches(arm, [])
    assert platform_matches(arm, ["linux/arm"]) and platform_matches(arm, ["linux/arm/v7"])
    assert not platform_matches(arm, ["linux/arm64"]) and not platform_matches(arm, ["linux/arm/v6"])
    assert not platform_matches({}, ["linux/amd64"])


def test_the_summary_line_says_where_the_bytes_came_from():
    done = {"event": "done", "ok": True, "blobs": 5, "bytes": 7 << 20, "seconds": 2.5, "from_registry": 6 << 20,
            "from_peers": 1 << 20, "held": 0, "replicas": 2, "below_floor": []}
    assert describe(done) == ("preheated: 5 blobs, 7.0 MiB in 2.5 s; from the registry 6.0 MiB, from peers 1.0 MiB, "
                              "already held 0 B; every blob has 2 holders")
    short = {**done, "ok": False, "below_floor": [D]}
    assert describe(short).startswith("preheat incomplete") and "1 blob has fewer than 2 holders" in describe(short)
    assert human(1536) == "1.5 KiB" and human(3 << 30) == "3.0 GiB"
