"""The compositing service's open streams (compositing_service/streaming/open_streams.py)
through its real server: the bound on open streams and its retry hint, and what the first
step of shutdown (`drain`) does to new, realtime and offline streams."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from compositing_service.server import start
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.serving.admission import RETRY_AFTER_KEY
from tests.avatar_factory import speech_like
from tests.conftest import service_config


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class HeldStream:
    """A stream whose request side stays open until `release()`."""

    def __init__(self, stub: cpb_grpc.CompositingServiceStub, realtime: bool):
        self._release = threading.Event()
        self._end_audio = threading.Event()
        self.realtime = realtime
        self.call = stub.StreamComposite(self._requests(), timeout=60)

    def _requests(self):  # type: ignore[no-untyped-def]
        yield cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", realtime=self.realtime))
        while not self._release.wait(0.05):
            if self._end_audio.is_set():
                yield cpb.StreamRequest(audio=speech_like(0.2, seed=4).tobytes())
                yield cpb.StreamRequest(end_of_audio=True)
                self._end_audio.clear()

    def speak(self) -> None:
        """Send a short clip and end it (its frames are made then)."""
        self._end_audio.set()

    def accepted(self) -> bool:
        return ("lipsync-stream", "accepted") in tuple(self.call.initial_metadata())

    def release(self) -> None:
        self._release.set()


@pytest.fixture()
def compositing(services, avatars_root, shared_encoder):  # type: ignore[no-untyped-def]
    cfg = service_config(avatars_root, shared_encoder)
    cfg.compositing.inference_address = services.inference_address
    cfg.compositing.stream.max_sessions = 2
    cfg.compositing.admission.retry_after_ms = 321
    comp = start(cfg, port=0, preload=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{comp.port}")
    yield comp, cpb_grpc.CompositingServiceStub(channel)
    channel.close()
    comp.stop(0)


def test_a_stream_past_max_sessions_is_refused_with_the_retry_hint(compositing):  # type: ignore[no-untyped-def]
    comp, stub = compositing
    held = [HeldStream(stub, realtime=False) for _ in range(2)]
    try:
        assert all(h.accepted() for h in held)
        assert comp.servicer.streams.count == 2
        refused = stub.StreamComposite(
            iter([cpb.StreamRequest(start=cpb.StreamStart(model_id="alice"))]), timeout=20
        )
        with pytest.raises(grpc.RpcError) as err:
            list(refused)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == "too many streams"
        assert (RETRY_AFTER_KEY, "321") in tuple(err.value.trailing_metadata())
        # a slot freed is a slot taken again
        held[0].release()
        wait_for(lambda: comp.servicer.streams.count == 1, 20, "the first stream's end")
        again = HeldStream(stub, realtime=False)
        held.append(again)
        assert again.accepted()
    finally:
        for h in held:
            h.release()
    wait_for(lambda: comp.servicer.streams.count == 0, 20, "every stream's end")


def test_drain_refuses_new_streams_ends_realtime_ones_and_lets_offline_ones_finish(
    compositing,
):  # type: ignore[no-untyped-def]
    comp, stub = compositing
    realtime, offline = HeldStream(stub, realtime=True), HeldStream(stub, realtime=False)
    try:
        assert realtime.accepted() and offline.accepted()
        comp.servicer.drain()  # what RunningService.stop does first
        # a new stream is refused: the service is shutting down
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.StreamComposite(
                    iter([cpb.StreamRequest(start=cpb.StreamStart(model_id="alice"))]),
                    timeout=20,
                )
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in err.value.details()
        # the realtime stream ends cleanly though its caller never closed its side
        list(realtime.call)
        assert realtime.call.code() == grpc.StatusCode.OK
        # the offline stream goes on: its speech is still made, and shutdown waits for it
        assert not comp.servicer.idle()
        offline.speak()
        first = next(offline.call)
        assert first.jpeg
        assert not comp.servicer.idle()
        offline.release()
        list(offline.call)
        assert offline.call.code() == grpc.StatusCode.OK
        wait_for(comp.servicer.idle, 20, "idle once the offline stream ended")
    finally:
        realtime.release()
        offline.release()
