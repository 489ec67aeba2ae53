"""Our content.proto must be wire-identical to containerd's own.

containerd's file is compiled with protoc (grpcio-tools) from Debian's
golang-github-containerd-containerd-dev, then every message, field, enum and method is
compared with the descriptors our generated stubs register.
"""

from __future__ import annotations

import os

import pytest
from google.protobuf import descriptor_pb2

from cs_p2p.api import content_pb2

GOCODE = "/usr/share/gocode/src"
CONTAINERD_PROTO = "github.com/containerd/containerd/api/services/content/v1/content.proto"
GOGO_ROOT = os.path.join(GOCODE, "github.com/gogo/protobuf")


def _containerd_descriptor(tmp_path, proto: str = CONTAINERD_PROTO) -> descriptor_pb2.FileDescriptorProto:
    grpc_tools = pytest.importorskip("grpc_tools")
    from grpc_tools import protoc

    if not os.path.exists(os.path.join(GOCODE, proto)):
        pytest.skip("containerd's .proto files are not installed (golang-github-containerd-containerd-dev)")
    out = tmp_path / "containerd.pb"
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{GOCODE}", f"-I{GOGO_ROOT}", f"-I{include}",
                      f"--descriptor_set_out={out}", "--include_imports", proto])
    assert rc == 0, f"protoc could not compile containerd's {proto}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return next(f for f in fds.file if f.name == proto)


def _ours(module=content_pb2) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)
    return fd


def _fields(msg: descriptor_pb2.DescriptorProto) -> dict:
    return {
        f.number: (f.name, f.type, f.label, f.type_name)
        for f in msg.field
    }


def _messages(fd: descriptor_pb2.FileDescriptorProto) -> dict:
    out = {}

    def walk(prefix: str, msgs) -> None:
        for m in msgs:
            name = f"{prefix}.{m.name}"
            out[name] = (_fields(m), m.options.map_entry)
            walk(name, m.nested_type)

    walk("." + fd.package, fd.message_type)
    return out


def test_package_and_service_match(tmp_path):
    theirs, ours = _containerd_descriptor(tmp_path), _ours()
    assert ours.package == theirs.package == "containerd.services.content.v1"
    assert [s.name for s in ours.service] == [s.name for s in theirs.service] == ["Content"]
    methods = lambda fd: {  # noqa: E731
        m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in fd.service[0].method
    }
    assert methods(ours) == methods(theirs)


def test_every_message_and_field_matches(tmp_path):
    theirs, ours = _messages(_containerd_descriptor(tmp_path)), _messages(_ours())
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], name


def test_enums_match(tmp_path):
    theirs, ours = _containerd_descriptor(tmp_path), _ours()
    values = lambda fd: {e.name: [(v.name, v.number) for v in e.value] for e in fd.enum_type}  # noqa: E731
    assert values(ours) == values(theirs)


DIFF_PROTO = "github.com/containerd/containerd/api/services/diff/v1/diff.proto"
# Fields containerd 2.x added after the 1.6 file Debian ships: the rest must match it exactly.
DIFF_2X_FIELDS = {".containerd.services.diff.v1.ApplyRequest": {4}, ".containerd.services.diff.v1.DiffRequest": {6}}


def test_diff_service_matches_containerds(tmp_path):
    from cs_p2p.api import diff_pb2, types_pb2

    theirs, ours = _containerd_descriptor(tmp_path, DIFF_PROTO), _ours(diff_pb2)
    assert ours.package == theirs.package == "containerd.services.diff.v1"
    methods = lambda fd: {m.name: (m.input_type, m.output_type) for m in fd.service[0].method}  # noqa: E731
    assert methods(ours) == methods(theirs)
    mine, want = _messages(ours), _messages(theirs)
    assert set(mine) == set(want)
    for name, (fields, is_map) in want.items():
        extra = {n: f for n, f in mine[name][0].items() if n not in fields}
        assert set(extra) == DIFF_2X_FIELDS.get(name, set()), name
        assert {n: f for n, f in mine[name][0].items() if n in fields} == fields, name
    for name in ("mount", "descriptor"):
        theirs_types = _containerd_descriptor(tmp_path, f"github.com/containerd/containerd/api/types/{name}.proto")
        for msg in theirs_types.message_type:
            if msg.name in types_pb2.DESCRIPTOR.message_types_by_name:
                mine_msg = descriptor_pb2.DescriptorProto()
                types_pb2.DESCRIPTOR.message_types_by_name[msg.name].CopyToProto(mine_msg)
                assert _fields(mine_msg) == _fields(msg), msg.name
