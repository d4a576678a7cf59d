"""Each service owns its metrics and tells the shared observer what its messages carry
(lipsync.serving.metrics.ServiceMetrics hooks); the observer itself reads no message."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from compositing_service.service_metrics import CompositingMetrics
from inference_service.service_metrics import InferenceMetrics
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import inference_pb2 as ipb
from lipsync.rpc.infer_wire import InferReply
from lipsync.serving import observability as observe
from lipsync.serving.metrics import CallView, ServiceMetrics

BATCH = "/compositing.CompositingService/InferBatchComposite"
INFER = "/lipsync.inference.InferenceService/Infer"


def observe_call(metrics: ServiceMetrics, method: str, request: Any, responses: list[Any]):  # type: ignore[no-untyped-def]
    """One call through the shared observer, as its interceptor drives it."""
    call = observe._Call(observe.ServerObserver(metrics, "off"), method, {})
    call.begin()
    call.request(request)
    for response in responses:
        call.response(response)
    call.finish(grpc.StatusCode.OK)
    return call


def batch_reply(frames: int) -> cpb.CompositeBatchResponse:
    return cpb.CompositeBatchResponse(
        success=True, composited_frames=[b"jpeg"] * frames, stage_times_ms={"crop": 2.0}
    )


def infer_reply(batch: int) -> InferReply:
    fields = ipb.InferResponse(batch_size=batch, stage_times_ms={"unet": 4.0})
    return InferReply(fields, np.zeros(4, np.uint8))


def value(m: ServiceMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_the_shared_metrics_count_calls_and_no_message():
    m = ServiceMetrics("plain")
    request = cpb.CompositeBatchRequest(model_id="alice", batch_size=3)
    call = observe_call(m, BATCH, request, [batch_reply(3)])
    assert call.frames == 0  # no frames on the access line: the base knows no reply
    assert call.view == CallView("InferBatchComposite", "alice")
    key = {"service": "plain", "rpc": "InferBatchComposite", "code": "OK"}
    assert value(m, "lipsync_requests_total", **key) == 1
    assert value(m, "lipsync_stage_seconds_count", service="plain", stage="crop") is None
    assert value(m, "lipsync_queue_depth", service="plain") == 0


def test_each_service_counts_its_own_replies_only():
    comp, inf = CompositingMetrics(), InferenceMetrics()
    request = cpb.CompositeBatchRequest(model_id="alice", batch_size=3)
    assert observe_call(comp, BATCH, request, [batch_reply(3)]).frames == 3
    assert observe_call(inf, BATCH, request, [batch_reply(3)]).frames == 0
    infer = ipb.InferRequest(model_id="alice", batch_size=2)
    assert observe_call(comp, INFER, infer, [infer_reply(2)]).frames == 0
    assert observe_call(inf, INFER, infer, [infer_reply(2)]).frames == 0

    key = {"model_id": "alice", "rpc": "InferBatchComposite"}
    assert value(comp, "lipsync_frames_total", **key) == 3
    assert value(comp, "lipsync_stage_seconds_count", service="compositing", stage="crop") == 1
    assert value(comp, "lipsync_stage_seconds_count", service="compositing", stage="unet") is None
    assert value(inf, "lipsync_inferred_frames_total") == 2
    assert value(inf, "lipsync_stage_seconds_count", service="inference", stage="unet") == 1
    assert value(inf, "lipsync_stage_seconds_count", service="inference", stage="crop") is None
    # each registry holds its own service's series only
    assert value(inf, "lipsync_frames_total", **key) is None
    assert value(comp, "lipsync_inferred_frames_total") is None


def test_a_failed_batch_delivers_no_frames():
    m = CompositingMetrics()
    request = cpb.CompositeBatchRequest(model_id="alice", batch_size=3)
    failed = cpb.CompositeBatchResponse(success=False, error="no audio")
    assert observe_call(m, BATCH, request, [failed]).frames == 0
    assert value(m, "lipsync_frames_total", model_id="alice", rpc="InferBatchComposite") is None


def test_a_stream_is_open_from_its_start_message_to_its_end():
    m = CompositingMetrics()
    method = "/compositing.CompositingService/StreamComposite"
    call = observe._Call(observe.ServerObserver(m, "off"), method, {})
    call.begin()
    call.request(cpb.StreamRequest(start=cpb.StreamStart(model_id="bob", realtime=True)))
    assert call.view == CallView("StreamComposite", "bob", "realtime")
    assert value(m, "lipsync_active_streams", mode="realtime") == 1
    call.response(cpb.StreamFrame(index=0, jpeg=b"x", generated=True, latency_ms=120.0))
    call.finish(grpc.StatusCode.CANCELLED)
    assert value(m, "lipsync_active_streams", mode="realtime") == 0
    assert value(m, "lipsync_stream_frame_latency_seconds_count", mode="realtime") == 1
    # a stream whose first message is not a start is not counted open
    call = observe._Call(observe.ServerObserver(m, "off"), method, {})
    call.begin()
    call.request(cpb.StreamRequest(end_of_audio=True))
    call.finish(grpc.StatusCode.INVALID_ARGUMENT)
    assert call.view == CallView("StreamComposite")
    assert value(m, "lipsync_active_streams", mode="offline") == 0


class ClipMetrics(ServiceMetrics):
    """A third service's metrics: what its replies carry is its own business."""

    def __init__(self) -> None:
        super().__init__("clips")
        self.seen: list[str] = []

    def call_started(self, rpc: str, request: Any) -> CallView:
        self.seen.append(f"start {rpc}")
        return CallView(rpc, "carol", "offline")

    def count_response(self, call: CallView, response: Any) -> int:
        self.seen.append(f"response {call.model_id}")
        return len(response.composited_frames)

    def call_ended(self, call: CallView) -> None:
        self.seen.append(f"end {call.stream_mode}")


def test_the_observer_asks_the_services_metrics_through_its_hooks():
    m = ClipMetrics()
    call = observe_call(m, BATCH, cpb.HealthRequest(), [batch_reply(2), batch_reply(5)])
    assert call.frames == 7
    assert m.seen == [
        "start InferBatchComposite",
        "response carol",
        "response carol",
        "end offline",
    ]
