"""InferResponse on the wire without copies: what the inference service sends is an
ordinary InferResponse to any protobuf parser, and the compositing service's split of a
reply equals protobuf's parse of it."""

from __future__ import annotations

import numpy as np
import pytest

from lipsync.proto import inference_pb2 as ipb
from lipsync.rpc.infer_wire import InferReply, parse_reply, serialize_reply


def _fields() -> ipb.InferResponse:
    return ipb.InferResponse(
        output_type=ipb.FLOAT32,
        batch_size=2,
        gpu_id=-1,
        stage_times_ms={"unet": 12.5, "mel": 0.25},
        execution_provider="CPUExecutionProvider",
    )


@pytest.mark.parametrize("nbytes", [0, 1, 127, 128, 300, 2 * 3 * 320 * 320 * 4])
def test_serialized_reply_is_an_ordinary_infer_response(nbytes):
    mouths = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    wire = serialize_reply(InferReply(_fields(), mouths))
    parsed = ipb.InferResponse.FromString(wire)
    expected = _fields()
    expected.mouths = mouths.tobytes()
    assert parsed == expected


def test_a_float_array_is_sent_from_its_memory():
    mouths = np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32)
    parsed = ipb.InferResponse.FromString(serialize_reply(InferReply(_fields(), mouths)))
    assert parsed.mouths == mouths.tobytes()
    with pytest.raises((ValueError, TypeError)):  # a strided view is refused, not garbled
        serialize_reply(InferReply(_fields(), mouths[:, ::2]))


def test_parse_matches_protobuf_and_returns_a_view_of_the_received_bytes():
    msg = _fields()
    msg.mouths = bytes(range(256)) * 1000
    data = msg.SerializeToString()
    fields, mouths = parse_reply(data)
    assert isinstance(mouths, memoryview) and mouths.obj is data  # no copy
    assert bytes(mouths) == msg.mouths
    msg.mouths = b""
    assert fields == msg


def test_parse_accepts_any_field_order_unknown_fields_and_repeats():
    mouths = b"\x01\x02\x03"
    head = _fields().SerializeToString()
    unknown = bytes([15 << 3 | 0, 7]) + bytes([14 << 3 | 5]) + b"abcd"  # fields 15, 14
    first = bytes([1 << 3 | 2, 2]) + b"zz"  # an earlier mouths: the last one wins
    data = first + unknown + head + bytes([1 << 3 | 2, 3]) + mouths
    fields, got = parse_reply(data)
    assert bytes(got) == mouths == ipb.InferResponse.FromString(data).mouths
    assert fields.stage_times_ms == _fields().stage_times_ms
    assert fields.execution_provider == "CPUExecutionProvider"


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_a_truncated_reply_is_an_error(cut):
    msg = _fields()
    msg.mouths = b"x" * 1000
    data = msg.SerializeToString()
    with pytest.raises(ValueError):
        parse_reply(data[:-cut])


def test_an_empty_reply_parses():
    fields, mouths = parse_reply(b"")
    assert fields == ipb.InferResponse() and len(mouths) == 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_the_inference_service_reply_reads_the_same_with_a_stock_stub(services, dtype):
    """The real inference service: a generated stub (protobuf parse) and the compositing
    service's client (split, no copy) read the same mouths and fields."""
    import grpc

    from compositing_service.inference_client import (
        TRANSFER_TYPES,
        InferenceClient,
        to_paste_pixels,
    )
    from lipsync.proto import inference_pb2_grpc as ipb_grpc
    from lipsync.rpc.infer_wire import infer_callable

    rng = np.random.default_rng(1)
    request = ipb.InferRequest(
        model_id="alice",
        batch_size=3,
        face_crops=rng.integers(0, 256, (3, 320, 320, 3), dtype=np.uint8).tobytes(),
        audio_features=rng.standard_normal((32, 16, 16)).astype(np.float32).tobytes(),
        output_type=TRANSFER_TYPES[dtype],
    )
    with grpc.insecure_channel(services.inference_address) as channel:
        stock = ipb_grpc.InferenceServiceStub(channel).Infer(request, timeout=60)
        fields, mouths = infer_callable(channel)(request, timeout=60)
    assert (
        bytes(mouths) == stock.mouths
        and len(stock.mouths)
        == 3 * 320 * 320 * 3 * ({"float32": 4, "float16": 2, "uint8": 1}[dtype])
    )
    stock_mouths = stock.mouths
    stock.mouths = b""
    fields.stage_times_ms.clear()  # timings differ between the two calls
    stock.stage_times_ms.clear()
    assert fields == stock and fields.batch_size == 3
    client = InferenceClient(services.inference_address, 1 << 28, 60, dtype)
    try:
        got = client.call(request)
    finally:
        client.close()
    expected = to_paste_pixels(stock_mouths, TRANSFER_TYPES[dtype], 3)
    assert got.pixels.dtype == np.uint8 and np.array_equal(got.pixels, expected)
