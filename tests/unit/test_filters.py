"""containerd's filter syntax, as ctr and containerd's GC send it."""

from __future__ import annotations

import pytest

from cs_p2p.errors import InvalidArgument
from cs_p2p.filters import info_adaptor, parse_filters, status_adaptor

D = "sha256:" + "ab" * 32
INFO = info_adaptor(D, {"containerd.io/gc.root": "2024", "a.b": "dotted", "x": "y z"})


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"digest=={D}", True),
        ("digest==sha256:00", False),
        ('labels."containerd.io/gc.root"', True),
        ('labels."containerd.io/gc.root"==2024', True),
        ("labels.a.b==dotted", True),  # an unquoted dotted path joins with "."
        ('labels.x=="y z"', True),
        ("labels.x~=^y", True),
        ("labels.x~=/z$/", True),
        ("labels.x~=|^q|", False),
        ("labels.missing", False),
        ("labels.missing!=v", True),
        ("labels.x!=v", True),
        (f"  digest == {D} , labels.x ", True),
        (f"digest=={D},labels.missing", False),
        ("size==1", False),  # containerd does not filter on size
    ],
)
def test_info_selectors(text, expected):
    assert parse_filters([text]).match(INFO) is expected


def test_repeated_filters_are_alternatives_and_empty_matches_all():
    assert parse_filters(["labels.missing", f"digest=={D}"]).match(INFO)
    assert parse_filters([]).match(INFO)
    assert parse_filters([""]).match(INFO)


def test_status_filters_see_only_ref():
    st = status_adaptor("default/1/layer-sha256:aa")
    assert parse_filters(['ref~="^default/"']).match(st)
    assert not parse_filters(["labels.x"]).match(st)


@pytest.mark.parametrize("bad", ["labels.x==", "==x", "labels.x~=(", 'labels."unterminated', "a,,b", "a b", "labels.x=y",
                                 'labels."bad\\q"'])
def test_malformed_filters_are_invalid_argument(bad):
    with pytest.raises(InvalidArgument):
        parse_filters([bad])
