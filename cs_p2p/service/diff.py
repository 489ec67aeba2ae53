"""containerd.services.diff.v1.Diff: cs-p2p as containerd 2.x's layer applier.

containerd reads a proxied content store back 32 KiB per `Read` RPC, which caps an unpack
through any content proxy at ~0.4 of the builtin store (../shared/notes/containerd-read-path.md).
As a proxy plugin of type "diff", cs-p2p gets the layer's descriptor and the snapshot's
mounts instead, and applies the blob straight from its own file, or from a peer fetch as
it lands, in a worker process (`cs_p2p.apply`).

What it leaves to containerd answers UNIMPLEMENTED, which containerd's diff service takes
as "try the next differ" (`default = ["cs-p2p-diff", "walking"]`): layers with a stream
processor (encrypted), media types it does not know, and `Diff` (making a layer from a
container's changes, e.g. `nerdctl commit`), which the walking differ does.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import grpc

from ..api import diff_pb2 as pb
from ..api import diff_pb2_grpc as pb_grpc
from ..api import types_pb2
from ..apply.pool import ApplyPool
from ..apply.worker import target_for
from ..digests import parse_digest
from ..errors import InvalidArgument, NotFound, Unimplemented
from ..store import LocalStore
from ..timeline import TIMELINE
from .errors import grpc_errors

if TYPE_CHECKING:
    from ..fetch.source import PeerSource

log = logging.getLogger("cs_p2p.apply")

MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
# Layer media types whose blob is a tar, plain or compressed (detected by magic bytes, as
# containerd does); anything else (e.g. `+encrypted`) is left to containerd.
LAYER_MEDIA_TYPES = frozenset({
    MT_LAYER, MT_LAYER + "+gzip", MT_LAYER + "+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})


class DiffService(pb_grpc.DiffServicer):
    def __init__(self, store: LocalStore, pool: ApplyPool, peers: "PeerSource | None" = None) -> None:
        self.store = store
        self.pool = pool
        self.peers = peers

    @grpc_errors
    async def Apply(self, request: pb.ApplyRequest, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:
        desc = request.diff
        if desc.media_type not in LAYER_MEDIA_TYPES:
            raise Unimplemented(f"cs-p2p does not apply layers of media type {desc.media_type!r}")
        if request.payloads:
            raise Unimplemented("cs-p2p does not run stream processors (e.g. decryption): "
                                f"{sorted(request.payloads)}")
        hex_ = parse_digest(desc.digest)
        if not request.mounts:
            raise InvalidArgument("apply: no mounts")
        target = target_for([(m.type, m.source, tuple(m.options)) for m in request.mounts])
        t0 = time.monotonic()
        TIMELINE.mark("apply_start", desc.digest, size=desc.size)
        path = self.store.blobs.blob_path(hex_)
        fetch = None
        if not os.path.exists(path) and self.peers is not None:
            fetch = self.peers.inflight(desc.digest) or await self.peers.locate(desc.digest)
        if fetch is not None:
            source = "peers"
            diff_id, size = await self.pool.apply_fetch(fetch, target, request.sync_fs)
        elif os.path.exists(path):  # held, or committed by a fetch that just ended
            source = "local"
            diff_id, size = await self.pool.apply_file(path, target, request.sync_fs)
        else:  # a fetch that failed before containerd asked: say why, as Info and Read do
            raise self.peers.not_found(desc.digest) if self.peers else NotFound(f"content {desc.digest}: not found")
        TIMELINE.mark("apply_done", desc.digest, source=source, seconds=round(time.monotonic() - t0, 3))
        log.info("layer applied", extra={"digest": desc.digest, "diff_id": diff_id, "size": size, "from": source,
                                         "target": target.kind, "seconds": round(time.monotonic() - t0, 3)})
        return pb.ApplyResponse(applied=types_pb2.Descriptor(media_type=MT_LAYER, digest=diff_id, size=size))

    @grpc_errors
    async def Diff(self, request: pb.DiffRequest, context: grpc.aio.ServicerContext) -> pb.DiffResponse:
        raise Unimplemented("cs-p2p does not create layers; containerd's walking differ does")
