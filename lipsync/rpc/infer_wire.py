"""The inference service's InferResponse on the wire without copying the mouth regions.

The mouths are the bulk of every reply (1.2 MB a frame as float32), and protobuf's Python
runtime copies a bytes field when a message is built, when it is serialized, when it is
parsed and again on every read. So the inference service serializes its reply itself: the
other fields with protobuf, then the mouths appended as their field straight from the
array's memory (protobuf parsers accept fields in any order; a stock client reads the
reply as an ordinary InferResponse). The compositing service's client splits a reply the
same way: the mouths as a view of the received bytes, the other fields parsed by protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc

MOUTHS_FIELD = ipb.InferResponse.DESCRIPTOR.fields_by_name["mouths"].number
_LENGTH_DELIMITED = 2
_MOUTHS_TAG = bytes([MOUTHS_FIELD << 3 | _LENGTH_DELIMITED])
INFER_METHOD = "/lipsync.inference.InferenceService/Infer"


@dataclass(frozen=True)
class InferReply:
    """An InferResponse (`fields`, its `mouths` left empty) and the mouths' bytes as any
    C-contiguous buffer, e.g. the output array itself."""

    fields: ipb.InferResponse
    mouths: np.ndarray | bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("InferResponse: truncated or malformed varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def serialize_reply(reply: InferReply | ipb.InferResponse) -> bytes:
    """The wire bytes of a reply: one copy of the mouths, into the result."""
    if isinstance(reply, ipb.InferResponse):
        return reply.SerializeToString()
    if reply.fields.mouths:
        raise ValueError("InferReply.fields must leave mouths empty")
    mouths = memoryview(reply.mouths).cast("B")  # raises for non-contiguous buffers
    if not len(mouths):
        return reply.fields.SerializeToString()
    return b"".join((reply.fields.SerializeToString(), _MOUTHS_TAG, _varint(len(mouths)), mouths))


def parse_reply(data: bytes) -> tuple[ipb.InferResponse, memoryview]:
    """Split a serialized InferResponse into its other fields (parsed by protobuf, `mouths`
    empty) and a view of the mouths' bytes inside `data` (the last occurrence wins, as in
    protobuf)."""
    view = memoryview(data)
    mouths, others, i = view[0:0], [], 0
    while i < len(data):
        start = i
        key, i = _read_varint(data, i)
        wire_type = key & 7
        if wire_type == 0:
            _, i = _read_varint(data, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, i = _read_varint(data, i)
            i += length
            if key >> 3 == MOUTHS_FIELD:
                if i > len(data):
                    break
                mouths = view[i - length : i]
                continue
        else:
            raise ValueError(f"InferResponse: unsupported wire type {wire_type}")
        others.append(view[start:i])
    if i != len(data):
        raise ValueError("InferResponse: truncated message")
    return ipb.InferResponse.FromString(b"".join(others)), mouths


def infer_callable(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """InferenceService.Infer on `channel`, answering (fields, mouths view)."""
    return channel.unary_unary(
        INFER_METHOD,
        request_serializer=ipb.InferRequest.SerializeToString,
        response_deserializer=parse_reply,
    )


class _Recorder:
    """Stands in for a server to capture the generated method handlers."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_inference_servicer(
    servicer: ipb_grpc.InferenceServiceServicer, server: grpc.Server
) -> None:
    """Register the inference service like the generated code does, with Infer's replies
    serialized by `serialize_reply` (its handler may return an InferReply)."""
    recorder = _Recorder()
    ipb_grpc.add_InferenceServiceServicer_to_server(servicer, recorder)
    handlers = dict(recorder.handlers)
    handlers["Infer"] = handlers["Infer"]._replace(response_serializer=serialize_reply)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(recorder.service, handlers),)
    )
    server.add_registered_method_handlers(recorder.service, handlers)
