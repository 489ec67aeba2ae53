"""Typed errors of the content store.

Every failure the store can report to containerd is one of these classes, each bound to
the gRPC status code containerd's own `errdefs` uses for it.  The service maps them to
gRPC in exactly one place (`cs_p2p.service.grpc_errors`), so the store never imports grpc.
"""

from __future__ import annotations

import grpc


class ContentError(Exception):
    """Base of all errors the store reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class NotFound(ContentError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ContentError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgument(ContentError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ContentError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ContentError):
    """Only for "this ref is being written by someone else": containerd retries it forever."""

    code = grpc.StatusCode.UNAVAILABLE


class OutOfRange(ContentError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Aborted(ContentError):
    """A blob being fetched from peers could not be completed (every provider failed, or the
    bytes did not match the digest).  Not UNAVAILABLE: containerd would retry that forever."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(ContentError):
    """A bound of the store was reached (open ingests, their disk use); the client may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unimplemented(ContentError):
    """Asked of cs-p2p's layer applier for something it leaves to containerd (an encrypted
    layer, making a diff): containerd's diff service then tries its next differ."""

    code = grpc.StatusCode.UNIMPLEMENTED


class LayerRejected(ContentError):
    """A layer that cannot be applied as it is: a malformed tar or compressed stream, or an
    entry containerd's applier refuses too."""

    code = grpc.StatusCode.FAILED_PRECONDITION
