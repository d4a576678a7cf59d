"""WebRTC viewers of the gateway (lipsync/web/webrtc_session.py, webrtc_media.py): the
offer's checks, a Python viewer (aiortc) on the real services, the media pieces, and the
page in headless Chromium with a fake microphone playing a speech file."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import shutil
import subprocess
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
import pytest
import soundfile as sf
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCPeerConnection

from benchmarks.webrtc_viewer import RATE, Viewer
from lipsync.local.launch import stop_processes
from lipsync.proto import compositing_pb2 as cpb
from lipsync.web.app import PEERS, create_app
from lipsync.web.webrtc_media import AvatarAudioTrack, AvatarVideoTrack, JpegToH264, is_idr
from lipsync.web.webrtc_session import HANGOVER_S, PREROLL_S, SilenceGate
from tests.avatar_factory import speech_like
from tests.test_web import (
    CHROMIUM,
    BackgroundGateway,
    page_devtools,
    start_chromium,
)


def run(coro):
    return asyncio.run(coro)


def speech_then_silence(speech_s: float, silence_s: float, seed: int) -> np.ndarray:
    return np.concatenate(
        [speech_like(speech_s, sr=RATE, seed=seed), np.zeros(int(silence_s * RATE), np.float32)]
    )


async def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def a_real_offer(video: bool = True, audio: bool = True) -> str:
    """An offer as a browser makes it (aiortc's): audio sendrecv, video recvonly, data."""
    pc = RTCPeerConnection()
    if audio:
        pc.addTransceiver("audio", direction="sendrecv")
    if video:
        pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


# -- the offer's checks ------------------------------------------------------------------
def test_hostile_offers_get_a_4xx_and_leave_nothing_behind(services):
    servicer = services.compositing.servicer

    async def body():
        good = await a_real_offer()
        no_video = await a_real_offer(video=False)
        vp8_only = "\n".join(
            line
            for line in good.splitlines()
            if "H264" not in line and "profile-level-id" not in line
        )
        app = create_app(services.address)
        async with TestClient(TestServer(app)) as client:
            cases: list[tuple[Any, int, str]] = [
                (b"not json", 400, "json"),
                ([1, 2], 400, "object"),
                ({"sdp": good, "type": "answer", "model_id": "alice"}, 400, "type"),
                ({"sdp": good, "type": "offer"}, 400, "model_id"),
                ({"sdp": "", "type": "offer", "model_id": "alice"}, 400, "sdp"),
                ({"sdp": 5, "type": "offer", "model_id": "alice"}, 400, "sdp"),
                ({"sdp": "v=0\r\ngarbage", "type": "offer", "model_id": "alice"}, 400, ""),
                ({"sdp": good, "type": "offer", "model_id": "alice", "x": 1}, 400, "unknown"),
                ({"sdp": good, "type": "offer", "model_id": "alice", "key": 7}, 400, "key"),
                ({"sdp": no_video, "type": "offer", "model_id": "alice"}, 400, "video"),
                ({"sdp": vp8_only, "type": "offer", "model_id": "alice"}, 400, "h.264"),
                ({"sdp": good, "type": "offer", "model_id": "nobody"}, 404, "unknown model"),
                ({"sdp": good, "type": "offer", "model_id": "../alice"}, 404, "unknown model"),
                ({"sdp": "v=0\n" + "a=x\n" * 20000, "type": "offer", "model_id": "a"}, 413, ""),
                (b"{" + b" " * (100 << 10) + b"}", 413, "larger"),
            ]
            for payload, status, needle in cases:
                if isinstance(payload, bytes):
                    resp = await client.post("/webrtc/offer", data=payload)
                else:
                    resp = await client.post("/webrtc/offer", json=payload)
                obj = await resp.json()
                assert resp.status == status, (payload if len(str(payload)) < 200 else "", obj)
                assert needle.lower() in obj["error"].lower(), obj
                assert set(obj) == {"error"}
                assert not app[PEERS]
            # a page of another origin may not open a session
            resp = await client.post(
                "/webrtc/offer",
                json={"sdp": good, "type": "offer", "model_id": "alice"},
                headers={"Origin": "https://evil.example"},
            )
            assert resp.status == 403 and not app[PEERS]
            metrics = await (await client.get("/metrics")).text()
            health = await client.get("/healthz")
            assert health.status == 200
            return metrics

    metrics = run(body())
    assert "lipsync_gateway_webrtc_sessions 0.0" in metrics
    assert servicer.streams.count == 0  # no stream was opened for any of them


def test_the_session_limit_refuses_with_503(services):
    async def body():
        app = create_app(services.address, webrtc_max_sessions=1)
        async with TestClient(TestServer(app)) as client:
            base = str(client.make_url("")).rstrip("/")
            v = Viewer(base, "alice", np.zeros(RATE * 20, np.float32), keep_frames=False)
            async with aiohttp.ClientSession() as http:
                await v.connect(http)
                offer = await a_real_offer()
                resp = await client.post(
                    "/webrtc/offer", json={"sdp": offer, "type": "offer", "model_id": "bob"}
                )
                status = resp.status
                await v.close()
                await wait_until(lambda: not app[PEERS], 20, "the session to end")
        return status

    assert run(body()) == 503


# -- a viewer ------------------------------------------------------------------------------
def test_a_python_viewer_gets_h264_video_opus_sound_and_metadata(services):
    servicer = services.compositing.servicer
    signal = np.concatenate([np.zeros(RATE // 2, np.float32), speech_then_silence(2.0, 10.0, 21)])

    async def body():
        app = create_app(services.address)
        async with TestClient(TestServer(app)) as client:
            base = str(client.make_url("")).rstrip("/")
            v = Viewer(base, "alice", signal)
            async with aiohttp.ClientSession() as http:
                await v.connect(http)
                assert len(app[PEERS]) == 1
                await wait_until(
                    lambda: (
                        sum(m["generated"] for m in v.frames_meta()) >= 40
                        and sum(not m["generated"] for m in v.frames_meta()[-10:]) >= 5
                    ),
                    60,
                    "the clip's frames, then idle frames again",
                )
                v.send({"type": "ping", "t": 1})
                v.send({"type": "dance"})
                await wait_until(lambda: any(m["type"] == "pong" for m in v.meta), 10, "pong")
                session = next(iter(app[PEERS]))
                streams_open = servicer.streams.count
                await v.close()
                # the peer went away: its session and its stream end within seconds
                await wait_until(
                    lambda: not app[PEERS] and not servicer.streams.count, 20, "cleanup"
                )
            counts = {
                "prefetch_cut": session.mic_prefetch_cut,
                "sent": session.video.frames_sent,
                "made": session.video.fallback_frames + session.video.passthrough_frames,
            }
            gone = weakref.ref(session)
            del session
            gc.collect()
            return v, counts, gone(), streams_open

    v, counts, left, streams_open = run(body())
    assert left is None  # nothing holds on to a finished session
    assert streams_open == 1
    assert counts["prefetch_cut"]  # the microphone's audio is not held 80 ms
    assert "H264/90000" in v.answer and "profile-level-id=42e01f" in v.answer
    assert "packetization-mode=1" in v.answer
    meta = v.frames_meta()
    idx = [m["index"] for m in meta]
    assert idx == sorted(idx)
    assert any(m["speech"] for m in meta if m["generated"])
    errors = [m for m in v.meta if m["type"] == "error"]
    assert errors and "dance" in errors[0]["message"]
    # every frame was decoded by the viewer, at the avatar's size, in the order sent
    pairs = v.matched()
    assert len(pairs) >= 0.9 * len(v.video) and len(pairs) >= 40
    assert {(w, h) for _, _, w, h in v.video} == {(256, 224)}
    # the decoded pictures are the service's: compare generated frames with its JPEGs
    # through their metadata would need the JPEGs; instead the mouth area differs from
    # the idle frame of the same background while the model draws it (see the Chromium
    # test), and here: generated and idle pictures both decode to sane images
    assert all(img.shape == (224, 256, 3) and img.std() > 5 for img in v.images[:50])
    # its sound: the clip came back (Opus), as loud as sent
    audio = np.concatenate([a for _, a in v.audio])
    assert len(audio) > RATE * 2
    rms = float(np.sqrt(np.mean(audio**2)))
    assert rms > 0.02
    # the session encoded (this service sends JPEG) or passed through every frame it sent
    # (the viewer left while the last frame or two were on their way)
    sent = counts["sent"]
    assert len(meta) <= sent <= len(meta) + 2, (sent, len(meta))
    made = counts["made"]
    assert sent <= made <= sent + 1  # one may have been made as the viewer left


def test_a_viewer_whose_audio_stops_is_closed_by_the_gateway(services):
    """A page always sends its audio track (silence too): none for PEER_SILENT_S means the
    page is gone even while ICE still answers; the session and its stream are freed."""
    servicer = services.compositing.servicer

    async def body():
        app = create_app(services.address)
        async with TestClient(TestServer(app)) as client:
            base = str(client.make_url("")).rstrip("/")
            v = Viewer(base, "bob", np.zeros(RATE * 30, np.float32), stall_after_s=1.0)
            async with aiohttp.ClientSession() as http:
                await v.connect(http)
                await wait_until(lambda: len(v.video) >= 10, 30, "frames")
                await wait_until(lambda: not app[PEERS], 30, "the gateway to close it")
                await wait_until(lambda: not servicer.streams.count, 20, "the stream to end")
                await v.close()

    run(body())


# -- the media pieces ----------------------------------------------------------------------
def _frame(index: int, **kw: Any) -> cpb.StreamFrame:
    return cpb.StreamFrame(index=index, pts_ms=40.0 * index, **kw)


def _jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (224, 256, 3), np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_the_fallback_encoder_makes_constrained_baseline_h264_with_headers_on_keyframes():
    enc = JpegToH264()
    aus = [enc.encode(_jpeg(i), 40.0 * i, keyframe=i in (0, 7)) for i in range(10)]
    assert is_idr(aus[0]) and is_idr(aus[7]) and not is_idr(aus[3])
    for k in (0, 7):  # SPS (7) and PPS (8) before each keyframe
        types = [
            aus[k][i + 3] & 0x1F for i in range(len(aus[k]) - 3) if aus[k][i : i + 3] == b"\0\0\1"
        ]
        assert 7 in types and 8 in types
    sps = aus[0][aus[0].find(b"\0\0\1\x67") + 4 :]
    assert sps[0] == 66 and sps[1] & 0x40  # profile_idc baseline, constraint_set1 (constrained)
    dec = av.CodecContext.create("h264", "r")
    decoded = [f for au in aus for f in dec.decode(av.Packet(au))]
    assert len(decoded) == 10 and (decoded[0].width, decoded[0].height) == (256, 224)
    for i, f in enumerate(decoded):  # the JPEGs' pictures
        want = cv2.cvtColor(cv2.imdecode(np.frombuffer(_jpeg(i), np.uint8), 1), cv2.COLOR_BGR2RGB)
        err = np.mean((f.to_ndarray(format="rgb24").astype(np.float32) - want) ** 2)
        assert 10 * np.log10(255**2 / err) > 30


def test_the_fallback_encoder_keeps_the_jpeg_levels():
    """JPEG's YUV is full range, H.264's (as players read it) limited: without converting,
    a grey ramp comes back with its contrast stretched (mean error 9 levels, not 0.5)."""
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (224, 1, 3))
    jpeg = cv2.imencode(".jpg", ramp, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    want = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1), cv2.COLOR_BGR2RGB)
    enc = JpegToH264()
    dec = av.CodecContext.create("h264", "r")
    frames = [
        f for i in range(5) for f in dec.decode(av.Packet(enc.encode(jpeg, 40.0 * i, i == 0)))
    ]
    got = frames[-1].to_ndarray(format="rgb24").astype(np.float32)
    assert np.abs(got - want).mean() < 2


def test_the_video_track_passes_h264_through_and_waits_for_a_keyframe():
    asked: list[int] = []
    enc = JpegToH264()
    aus = [enc.encode(_jpeg(i), 40.0 * i, keyframe=i == 2) for i in range(5)]

    async def body():
        track = AvatarVideoTrack(lambda: asked.append(1))
        for i in (1, 2, 3):  # starts mid-GOP: frame 1 is not decodable, 2 is a keyframe
            track.put(_frame(i, h264=aus[i], keyframe=i == 2))
        packets = [await track.recv(), await track.recv()]
        track.keyframe_wanted()  # a viewer's PLI
        track.put(_frame(4, h264=aus[4]))
        track.stop()
        with pytest.raises(Exception):  # noqa: B017 - MediaStreamError
            await track.recv()
        return track, packets

    track, packets = run(body())
    assert [bytes(p) for p in packets] == [aus[2], aus[3]]  # byte for byte, not re-encoded
    assert [p.pts for p in packets] == [7200, 10800]  # 90 kHz RTP clock
    assert track.passthrough_frames == 2 and track.fallback_frames == 0
    assert asked  # the PLI asked the service for a keyframe


def test_the_audio_track_keeps_the_video_clock_across_missing_frames():
    pcm = (np.arange(640, dtype=np.int16) * 7).tobytes()

    async def body():
        track = AvatarAudioTrack()
        for i in (0, 1, 4):  # frames 2 and 3 skipped by the service
            track.put(_frame(i, audio=pcm))
        return [await track.recv() for _ in range(10)]

    frames = run(body())
    assert [f.pts for f in frames] == [320 * k for k in range(10)]
    assert all(f.samples == 320 and f.sample_rate == 16000 for f in frames)
    silent = [np.abs(f.to_ndarray()).max() == 0 for f in frames]
    assert silent == [False, False, False, False, True, True, True, True, False, False]


def test_the_silence_gate_ends_clips_and_keeps_a_preroll():
    gate = SilenceGate(48000)
    quiet = np.zeros(960, np.float32)
    loud = (0.1 * np.sin(np.arange(960) / 5)).astype(np.float32)
    sent, ends = [], 0
    for chunk in [quiet] * 30 + [loud] * 10 + [quiet] * 40 + [loud] * 5:
        out, ended = gate.push(chunk)
        ends += ended
        sent.extend(out)
    preroll = int(PREROLL_S * 48000 / 960)
    hang = int(HANGOVER_S * 48000 / 960)
    assert ends == 1
    assert len(sent) == (preroll + 10 + hang) + (preroll + 5)


# -- the page in headless Chromium ---------------------------------------------------------
def _mouth_contrast(img: np.ndarray, backgrounds: list[np.ndarray], rects: list) -> float:
    """How much more the picture differs from its background inside that background's
    crop rect (where the model draws the mouth) than outside it: ~1 for an idle frame
    (codec noise everywhere), well above for a generated one."""
    errs = [float(np.mean(np.abs(img.astype(np.float32) - b))) for b in backgrounds]
    k = int(np.argmin(errs))
    x1, y1, x2, y2 = rects[k]
    diff = np.abs(img.astype(np.float32) - backgrounds[k]).mean(axis=2)
    inside = np.zeros(diff.shape, bool)
    inside[y1:y2, x1:x2] = True
    return float(diff[inside].mean() / max(diff[~inside].mean(), 0.5))


@pytest.mark.slow
def test_page_over_webrtc_in_headless_chromium(services, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    servicer = services.compositing.servicer
    wav = tmp_path / "speech.wav"
    sr = 48000  # silence first (idle frames), then speech, looped by Chromium
    speech = np.concatenate([np.zeros(int(sr * 2.5), np.float32), speech_like(4.0, sr=sr, seed=31)])
    sf.write(wav, speech, sr, subtype="PCM_16")
    profile = tmp_path / "profile"
    gateway = BackgroundGateway(services.address)
    app = gateway.runner.app
    url = f"http://127.0.0.1:{gateway.port}/?model=alice"
    log = (tmp_path / "chromium.log").open("wb")
    proc = start_chromium(profile, wav, url, log)
    try:
        stats, grabs, peers_before, peers_after, streams_after = run(
            drive_webrtc_page(proc, profile, gateway.port, app, servicer)
        )
    finally:
        stop_processes([proc], 10)
        log.close()
        gateway.close()
        shutil.rmtree(profile, ignore_errors=True)

    print("\nwebrtc page stats: " + json.dumps({k: v for k, v in stats.items() if k != "models"}))
    assert stats["transport"] == "webrtc" and stats["error"] is None, stats
    assert stats["state"] == "streaming"
    assert "h264" in stats["videoCodec"].lower() and "42e01f" in stats["videoCodec"].lower()
    assert (stats["frameWidth"], stats["frameHeight"]) == (256, 224)
    assert stats["framesShown"] >= 50 and stats["videoFramesDecoded"] >= 50
    assert stats["audioBytesReceived"] > 0  # the avatar's sound arrived
    assert stats["generatedFrames"] > 0 and stats["speechFrames"] > 0
    assert peers_before == 1 and peers_after == 0 and streams_after == 0
    # the mouth: pictures grabbed from the <video> while only idle frames had been sent
    # show the avatar's own background; once speech frames come, the crop rect is drawn
    folder = Path(services.cfg.avatars_dir) / "alice"
    backgrounds = [
        cv2.cvtColor(cv2.imread(str(folder / "frames" / f"{i}.png")), cv2.COLOR_BGR2RGB).astype(
            np.float32
        )
        for i in range(7)
    ]
    rects = json.loads((folder / "crop_rects.json").read_text())
    idle = [_mouth_contrast(g, backgrounds, rects) for g, gen in grabs if gen == 0]
    talking = [_mouth_contrast(g, backgrounds, rects) for g, gen in grabs if gen == 5]
    print(f"mouth contrast: idle {np.round(idle, 2)}, talking {np.round(talking, 2)}")
    assert len(idle) >= 3 and len(talking) >= 3, (len(idle), len(talking))
    assert np.median(talking) > 2 * np.median(idle)


GRAB = """(() => {
  const v = document.getElementById('rtc');
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  if (!c.width) return null;
  c.getContext('2d').drawImage(v, 0, 0);
  return {png: c.toDataURL('image/png'), recent: window.lipsyncStats.recentGenerated};
})()"""


async def drive_webrtc_page(
    proc: subprocess.Popen, profile: Path, port: int, app, servicer
) -> tuple[dict[str, Any], list[tuple[np.ndarray, int]], int, int, int]:
    async with page_devtools(proc, profile, port) as cdp:
        assert await cdp.eval("document.getElementById('transport').value") == "webrtc"
        await cdp.eval("document.getElementById('mic').click(), true")
        await cdp.until("window.lipsyncStats.framesShown >= 5", 60)
        grabs: list[tuple[np.ndarray, int]] = []
        t_end = time.monotonic() + 40
        while time.monotonic() < t_end:  # bounded: 40 s, ~6 grabs a second
            g = await cdp.eval(GRAB)
            if g is not None and g["recent"] in (0, 5):
                png = base64.b64decode(g["png"].split(",", 1)[1])
                img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
                grabs.append((cv2.cvtColor(img, cv2.COLOR_BGR2RGB), g["recent"]))
            talking = sum(1 for _, r in grabs if r == 5)
            if talking >= 12 and sum(1 for _, r in grabs if r == 0) >= 5:
                break
            await asyncio.sleep(0.15)
        await asyncio.sleep(1.5)  # a second of stats
        stats = await cdp.eval("JSON.parse(JSON.stringify(window.lipsyncStats))")
        peers_before = len(app[PEERS])
        await cdp.call("Page.navigate", url="about:blank")  # the viewer leaves
        t0 = time.monotonic()
        while (app[PEERS] or servicer.streams.count) and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.1)
        print(f"session freed {time.monotonic() - t0:.1f} s after the page left")
        return stats, grabs, peers_before, len(app[PEERS]), servicer.streams.count
