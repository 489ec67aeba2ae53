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


def _containerd_descriptor(tmp_path) -> descriptor_pb2.FileDescriptorProto:
    grpc_tools = pytest.importorskip("grpc_tools")
    from grpc_tools import protoc

    if not os.path.exists(os.path.join(GOCODE, CONTAINERD_PROTO)):
        pytest.skip("containerd's .proto files are not installed (golang-github-containerd-containerd-dev)")
    out = tmp_path / "containerd.pb"
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{GOCODE}", f"-I{GOGO_ROOT}", f"-I{include}",
                      f"--descriptor_set_out={out}", CONTAINERD_PROTO])
    assert rc == 0, "protoc could not compile containerd's content.proto"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return next(f for f in fds.file if f.name == CONTAINERD_PROTO)


def _ours() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    content_pb2.DESCRIPTOR.CopyToProto(fd)
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
