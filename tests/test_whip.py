"""WHIP publishing (lipsync/client/whip.py) against a WHIP endpoint made here with aiortc and
aiohttp on loopback: the offer is answered with 201 + Location, the receiver gets the
stream's H.264 pictures undecoded-by-us and Opus audio, and closing DELETEs the session."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("aiortc")
web = pytest.importorskip("aiohttp.web")

from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from compositing_service.video_encoder import H264Encoder  # noqa: E402
from lipsync.client.video_out import VideoOutError  # noqa: E402
from lipsync.client.whip import WhipPublisher  # noqa: E402
from lipsync.config import H264Config  # noqa: E402
from lipsync.local.ports import free_port  # noqa: E402


class Receiver:
    """A WHIP endpoint: one aiortc peer per POST, counting what arrives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.video: list[tuple[int, int]] = []  # decoded picture sizes, by aiortc
        self.audio = 0
        self.deleted = threading.Event()
        self.auth: list[str | None] = []
        self._pcs: list[RTCPeerConnection] = []
        self._tasks: list[asyncio.Future] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/whip", self.post)
        app.router.add_delete("/whip/session/1", self.delete)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()

    async def post(self, request):
        self.auth.append(request.headers.get("Authorization"))
        pc = RTCPeerConnection()
        self._pcs.append(pc)

        @pc.on("track")
        def on_track(track):
            async def read():
                while True:
                    try:
                        frame = await track.recv()
                    except Exception:
                        return
                    if track.kind == "video":
                        self.video.append((frame.width, frame.height))
                    else:
                        self.audio += 1

            self._tasks.append(asyncio.ensure_future(read()))

        await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": "/whip/session/1"},
        )

    async def delete(self, request):
        self.deleted.set()
        return web.Response(status=200)

    def start(self) -> Receiver:
        self.thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def shutdown():
            for pc in self._pcs:
                await pc.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_publishes_h264_and_audio_to_a_whip_endpoint(receiver):
    enc = H264Encoder("libx264", H264Config(), 160, 120, 25)
    tone = (3000 * np.sin(2 * np.pi * 440 * np.arange(75 * 640) / 16000)).astype("<i2")
    url = f"http://127.0.0.1:{receiver.port}/whip"
    with WhipPublisher(url, 25, token="secret", timeout_s=10) as pub:
        for i in range(75):  # 3 s, at the pace a realtime stream sends
            au, key = enc.encode(np.full((120, 160, 3), (i * 7) % 255, np.uint8))
            pub.write(i, au, key, tone[i * 640 : (i + 1) * 640].tobytes())
            threading.Event().wait(0.04)
        assert pub.resource == f"{url}/session/1"
    assert receiver.deleted.wait(10)
    assert receiver.auth == ["Bearer secret"]
    # what crossed: H.264 pictures of the stream's size, most of them (UDP on loopback
    # under load may lose a few until the next keyframe), and audio
    assert receiver.video and set(receiver.video) == {(160, 120)}
    assert len(receiver.video) >= 25, len(receiver.video)
    assert receiver.audio > 0


def test_an_endpoint_that_refuses_is_a_clear_error(receiver):
    enc = H264Encoder("libx264", H264Config(), 64, 48, 25)
    au, key = enc.encode(np.zeros((48, 64, 3), np.uint8))
    pub = WhipPublisher(f"http://127.0.0.1:{receiver.port}/nowhere", 25, timeout_s=5)
    with pytest.raises(VideoOutError, match="HTTP 404"):
        pub.write(0, au, key)
    with pytest.raises(VideoOutError, match="http"):
        WhipPublisher("rtmp://127.0.0.1/x", 25)


def test_cli_pushes_whip(services, receiver, tmp_path, capsys):
    import soundfile as sf

    from lipsync.cli import render as render_cli
    from lipsync.client import to_pcm16
    from tests.avatar_factory import speech_like

    wav = tmp_path / "clip.wav"
    sf.write(str(wav), to_pcm16(speech_like(1.5, seed=13)), 16000, subtype="PCM_16")
    url = f"http://127.0.0.1:{receiver.port}/whip"
    args = ["--model", "alice", "--audio", str(wav), "--server", services.address]
    rc = render_cli.main([*args, "--push", url, "-q"])
    assert rc == 0, capsys.readouterr().err
    assert receiver.deleted.wait(10)
    assert receiver.video and set(receiver.video) == {(256, 224)}
    assert receiver.audio > 0
