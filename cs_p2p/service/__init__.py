"""The gRPC servicers containerd talks to over the unix socket: content (`content`) and the
layer applier (`diff`).  The daemon that serves them is put together in `cs_p2p.daemon`."""

from __future__ import annotations

import grpc

from google.protobuf.message_factory import GetMessageClass

from ..api import content_pb2
from .content import ContentService
from .wire import decode_write_request, tolerant


def content_handler(servicer: ContentService) -> grpc.GenericRpcHandler:
    """Method handlers for the Content service, built from its descriptor.

    Like the generated `add_ContentServicer_to_server`, except that Write's requests are
    decoded without copying their data (`wire.decode_write_request`) and undecodable
    requests reach the handler as `wire.Malformed` (answered INVALID_ARGUMENT).
    """
    service = content_pb2.DESCRIPTOR.services_by_name["Content"]
    handlers = {}
    for method in service.methods:
        request = GetMessageClass(method.input_type)
        response = GetMessageClass(method.output_type)
        decode = decode_write_request if method.name == "Write" else request.FromString
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=tolerant(decode),
                                     response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
