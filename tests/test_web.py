"""The web gateway (lipsync/web): page and API, the WebSocket bridge to StreamComposite, and
the page itself in headless Chromium with a fake microphone playing a speech file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from lipsync.core import audio, windows
from lipsync.local.launch import stop_processes
from lipsync.web.app import create_app
from lipsync.web.cli import parse_args
from lipsync.web.ws_protocol import unpack_frame
from tests.avatar_factory import speech_like
from tests.oracle import decode_jpeg

CHROMIUM = "/usr/bin/chromium"


def start_chromium(profile: Path, wav: Path, url: str, log: IO[bytes]) -> subprocess.Popen:
    """Headless Chromium on `url` with a fresh profile, a fake microphone playing `wav`
    and DevTools on a port of its choosing (DevTools reads it from the profile)."""
    return subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required",
            "--window-size=1280,900",
            "--remote-debugging-port=0",
            url,
        ],
        stdout=log,
        stderr=log,
    )


def run(coro):
    return asyncio.run(coro)


class Session:
    """A test client of the gateway's WebSocket: frames, text messages and the close."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.frames: list[tuple[dict[str, Any], bytes, bytes, float]] = []  # + receive ms
        self.texts: list[dict[str, Any]] = []
        self.pongs: asyncio.Queue[tuple[dict[str, Any], float]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                now = time.time() * 1000
                header, pcm, jpeg = unpack_frame(msg.data)
                self.frames.append((header, pcm, jpeg, now))
            elif msg.type == WSMsgType.TEXT:
                obj = json.loads(msg.data)
                self.texts.append(obj)
                if obj.get("type") == "pong":
                    self.pongs.put_nowait((obj, time.perf_counter()))
        self.close_code = self.ws.close_code
        self.closed.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [t for t in self.texts if t.get("type") == kind]

    async def wait(self, cond, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met; texts={self.texts[-3:]}")
            await asyncio.sleep(0.02)

    async def send_audio(self, x: np.ndarray, chunk_ms: int = 40, realtime: bool = True) -> None:
        n = 16 * chunk_ms
        for i in range(0, len(x), n):
            await self.ws.send_bytes(x[i : i + n].astype("<f4").tobytes())
            if realtime:
                await asyncio.sleep(chunk_ms / 1000)


async def with_client(services, body):
    async with TestClient(TestServer(create_app(services.address))) as client:
        return await body(client)


async def open_session(client: TestClient, **start) -> Session:
    ws = await client.ws_connect("/ws")
    s = Session(ws)
    await ws.send_json({"type": "start", **start})
    return s


# -- page, assets, API -----------------------------------------------------------------------
def test_page_and_assets_are_served_without_external_resources(services):
    async def body(client):
        page = await client.get("/")
        assert page.status == 200
        html = await page.text()
        assert "<canvas" in html and "/static/app.js" in html
        js = await client.get("/static/app.js")
        assert js.status == 200 and "javascript" in js.headers["Content-Type"]
        src = await js.text()
        assert "lipsyncStats" in src and "audioWorklet" in src
        health = await client.get("/healthz")
        assert (await health.json())["ok"] is True
        return html + src

    text = run(with_client(services, body))
    for needle in ("http://", "https://", "//cdn", '<script src="http'):
        assert needle not in text, f"the page must not load {needle}"


def test_api_models_lists_the_avatars(services):
    async def body(client):
        resp = await client.get("/api/models")
        assert resp.status == 200
        return await resp.json()

    models = run(with_client(services, body))
    by_id = {m["model_id"]: m for m in models}
    assert {"alice", "bob"} <= set(by_id)
    assert by_id["alice"]["fps"] == 25


def test_api_models_when_the_service_is_down():
    async def body():
        async with TestClient(TestServer(create_app("127.0.0.1:1"))) as client:
            resp = await client.get("/api/models")
            return resp.status, await resp.json()

    status, obj = run(body())
    assert status == 502 and "cannot reach the compositing service" in obj["error"]


def test_cli_defaults_come_from_the_environment():
    args = parse_args([], env={})
    # localhost unless told otherwise (docs/SECURITY.md; the images set 0.0.0.0)
    assert (args.port, args.server, args.host) == (8080, "localhost:50052", "127.0.0.1")
    args = parse_args([], env={"LIPSYNC_WEB__PORT": "9000", "COMPOSITING_ADDRESS": "comp:1234"})
    assert (args.port, args.server) == (9000, "comp:1234")
    args = parse_args(["--port", "81", "--server", "x:1", "--host", "0.0.0.0"], env={})
    assert (args.port, args.server, args.host) == (81, "x:1", "0.0.0.0")


# -- WebSocket sessions ----------------------------------------------------------------------
def test_websocket_session_streams_frames_with_their_audio(services):
    clip = speech_like(1.6, seed=7)
    n_clip = windows.clip_frame_count(1 + len(clip) // audio.HOP)

    async def body(client):
        s = await open_session(client, model="alice", sample_rate=16000, realtime=True)
        await s.wait(lambda: s.of_type("started"))
        await s.send_audio(clip, chunk_ms=40, realtime=True)
        await s.ws.send_json({"type": "end_of_audio"})
        for k in range(5):
            await s.ws.send_json({"type": "ping", "t": time.perf_counter() * 1000, "k": k})
            await asyncio.sleep(0.05)
        await s.wait(lambda: sum(f[0]["generated"] for f in s.frames) >= n_clip)
        await s.ws.send_json({"type": "stop"})
        await asyncio.wait_for(s.closed.wait(), 20)
        return s, time.perf_counter() * 1000

    s, _ = run(with_client(services, body))
    pongs = s.of_type("pong")
    assert len(pongs) == 5 and all("server_ms" in p for p in pongs)
    assert s.of_type("end") and not s.of_type("error") and s.close_code == 1000

    heads = [f[0] for f in s.frames]
    idx = [h["index"] for h in heads]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert all(h["pts_ms"] == 40.0 * h["index"] for h in heads)
    gen = [f for f in s.frames if f[0]["generated"]]
    assert [f[0]["clip_frame"] for f in gen] == list(range(n_clip))
    assert {f[0]["clip"] for f in gen} == {0}
    assert any(f[0]["speech"] for f in gen)
    for h, pcm, jpeg, _ in s.frames:
        assert h["audio_len"] == len(pcm) == 1280 and h["audio_rate"] == 16000
        assert jpeg[:2] == b"\xff\xd8" and len(jpeg) == h["jpeg_len"]
        assert math.isfinite(h["latency_ms"]) and h["latency_ms"] >= 0
    assert decode_jpeg(gen[0][2]).shape[:2] == (224, 256)
    # each generated frame carries its own 40 ms of the clip: what the page plays with it
    for h, pcm, _, _ in gen[: n_clip - 2]:
        want = clip[h["clip_frame"] * 640 : (h["clip_frame"] + 1) * 640]
        got = np.frombuffer(pcm, "<i2")[: len(want)].astype(np.float32) / 32767
        assert np.max(np.abs(got - want)) < 2e-4
    # the WebSocket hop over loopback: gateway send -> client receive
    hops = [recv - h["sent_ms"] for h, _, _, recv in s.frames]
    gateway = [h["sent_ms"] - h["recv_ms"] for h in heads]
    print(
        f"\nWS hop (aiohttp client, loopback): median {statistics.median(hops):.2f} ms, "
        f"p95 {np.percentile(hops, 95):.2f} ms over {len(hops)} frames; "
        f"gateway gRPC->WS {statistics.median(gateway):.3f} ms; service latency of generated "
        f"frames median {statistics.median(f[0]['latency_ms'] for f in gen):.1f} ms"
    )
    assert statistics.median(hops) < 50


def test_ping_round_trip(services):
    async def body(client):
        s = await open_session(client, model="bob", sample_rate=48000)
        await s.wait(lambda: s.of_type("started"))
        rtts = []
        for k in range(30):
            t0 = time.perf_counter()
            await s.ws.send_json({"type": "ping", "t": k})
            pong, t1 = await asyncio.wait_for(s.pongs.get(), 10)
            assert pong["t"] == k and pong["server_ms"] > 0
            rtts.append((t1 - t0) * 1000)
            await asyncio.sleep(0.02)
        await s.ws.close()
        return rtts, s

    rtts, s = run(with_client(services, body))
    assert len(s.frames) > 0 and all(not f[0]["generated"] for f in s.frames)  # idling
    print(
        f"\nWS ping round trip (aiohttp client, loopback): median {statistics.median(rtts):.2f} ms"
    )


def test_interrupt_returns_to_idle_frames(services):
    clip = speech_like(4.0, seed=8)
    n_clip = windows.clip_frame_count(1 + len(clip) // audio.HOP)

    async def body(client):
        s = await open_session(client, model="alice", sample_rate=16000)
        await s.wait(lambda: s.of_type("started"))
        await s.send_audio(clip, chunk_ms=100, realtime=False)  # all of it, at once
        await s.wait(lambda: sum(f[0]["generated"] for f in s.frames) >= 5)
        await s.ws.send_json({"type": "interrupt"})
        n_at_interrupt = len(s.frames)
        await s.wait(lambda: len(s.frames) >= n_at_interrupt + 15)
        await s.ws.send_json({"type": "stop"})
        await asyncio.wait_for(s.closed.wait(), 20)
        return s

    s = run(with_client(services, body))
    gen = [f for f in s.frames if f[0]["generated"]]
    assert 5 <= len(gen) < n_clip  # the rest of the clip was dropped
    assert not any(f[0]["generated"] for f in s.frames[-8:])  # idling again
    assert s.of_type("end") and s.close_code == 1000


@pytest.mark.parametrize(
    "first, needle",
    [
        (b"\0\0\0\0", "start"),
        ("not json", "JSON"),
        ({"type": "hello"}, "start"),
        ({"type": "start"}, "model"),
        ({"type": "start", "model": "alice", "sample_rate": "fast"}, "sample_rate"),
        ({"type": "start", "model": "alice", "realtime": "yes"}, "realtime"),
        ({"type": "start", "model": "nobody"}, "unknown"),
        ({"type": "start", "model": "../alice"}, "invalid"),
        ({"type": "start", "model": "alice", "sample_rate": 5}, "sample_rate"),
    ],
)
def test_bad_start_gets_an_error_and_a_clean_close(services, first, needle):
    async def body(client):
        ws = await client.ws_connect("/ws")
        s = Session(ws)
        if isinstance(first, bytes):
            await ws.send_bytes(first)
        elif isinstance(first, str):
            await ws.send_str(first)
        else:
            await ws.send_json(first)
        await asyncio.wait_for(s.closed.wait(), 20)
        models = await (await client.get("/api/models")).json()
        return s, models

    s, models = run(with_client(services, body))
    errors = s.of_type("error")
    assert len(errors) == 1 and needle.lower() in errors[0]["message"].lower(), s.texts
    assert s.close_code in (1008, 1011)
    assert len(models) >= 2  # the gateway and the service keep serving


@pytest.mark.parametrize(
    "message, needle",
    [
        (b"\0" * 7, "float32"),
        ({"type": "start", "model": "alice"}, "first"),
        ({"type": "dance"}, "unknown"),
        (np.full(100, np.nan, np.float32).tobytes(), "nan"),
    ],
)
def test_bad_message_mid_session_gets_an_error(services, message, needle):
    async def body(client):
        s = await open_session(client, model="alice", sample_rate=16000)
        await s.wait(lambda: s.of_type("started"))
        if isinstance(message, bytes):
            await s.ws.send_bytes(message)
        else:
            await s.ws.send_json(message)
        await asyncio.wait_for(s.closed.wait(), 20)
        return s

    s = run(with_client(services, body))
    errors = s.of_type("error")
    assert len(errors) == 1 and needle.lower() in errors[0]["message"].lower(), s.texts
    assert s.close_code in (1008, 1011)


def test_closing_the_socket_cancels_the_grpc_stream(services):
    streams = services.compositing.servicer.streams

    async def body(client):
        s = await open_session(client, model="alice", sample_rate=16000)
        await s.wait(lambda: len(s.frames) >= 3)
        await s.send_audio(speech_like(1.0, seed=9), realtime=False)
        assert streams.count >= 1
        await s.ws.close()
        deadline = time.monotonic() + 10
        while streams.count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return streams.count

    assert run(with_client(services, body)) == 0


# -- the page in headless Chromium -----------------------------------------------------------
class BackgroundGateway:
    """The gateway on an ephemeral port, served from its own thread and event loop."""

    def __init__(self, server: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(create_app(server), access_log=None)

        async def start() -> int:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page target's WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.next_id = 0
        self.console: list[str] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            if msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"]["args"]
                self.console.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in args)
                )
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(msg["params"]["exceptionDetails"])[:500])

    async def eval(self, expression: str) -> Any:
        r = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expression: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                stats = await self.eval("JSON.stringify(window.lipsyncStats)")
                raise TimeoutError(f"{expression} not true; stats={stats}; log={self.console}")
            await asyncio.sleep(0.2)


STATS = "JSON.parse(JSON.stringify(window.lipsyncStats))"


@pytest.mark.slow
def test_page_in_headless_chromium_with_a_fake_microphone(services, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    wav = tmp_path / "speech.wav"
    sr = 48000
    speech = np.concatenate([speech_like(3.0, sr=sr, seed=11), np.zeros(sr // 2, np.float32)])
    sf.write(wav, speech, sr, subtype="PCM_16")
    profile = tmp_path / "profile"
    gateway = BackgroundGateway(services.address)
    url = f"http://127.0.0.1:{gateway.port}/?model=alice&transport=ws"  # the fallback
    log = (tmp_path / "chromium.log").open("wb")
    proc = start_chromium(profile, wav, url, log)
    clip = tmp_path / "clip.wav"  # for "Play a file": another rate, decoded by the page
    sf.write(clip, speech_like(2.0, sr=22050, seed=12), 22050, subtype="PCM_16")
    try:
        stats, file_stats, shot, console = run(
            drive_page(proc, profile, gateway.port, tmp_path, clip)
        )
    finally:
        stop_processes([proc], 10)
        log.close()
        gateway.close()
        shutil.rmtree(profile, ignore_errors=True)

    print(
        "\npage stats: "
        + json.dumps(
            {
                k: (round(v, 2) if isinstance(v, float) else v)
                for k, v in stats.items()
                if k not in ("models",)
            }
        )
    )
    assert stats["state"] in ("streaming", "closed"), (stats, console)
    assert stats["error"] is None, (stats, console)
    assert stats["framesReceived"] >= 25
    assert stats["generatedFrames"] > 0 and stats["speechFrames"] > 0
    assert stats["distinctGeneratedFrames"] >= 5  # the mouth moves while speech plays
    assert stats["framesShown"] > 0 and stats["lastFrameHash"]
    assert stats["fps"] > 0
    assert isinstance(stats["latencyMs"], float | int) and math.isfinite(stats["latencyMs"])
    assert stats["rttMs"] is not None and stats["wsHopMs"] is not None
    assert stats["e2eMs"] is not None and math.isfinite(stats["e2eMs"])
    assert (stats["frameWidth"], stats["frameHeight"]) == (256, 224)
    assert stats["closedAfterStop"] == "closed"
    assert shot.stat().st_size > 10_000
    # "Play a file": a new session; the clip's frames, then idle frames once it ended
    print(f"file stats: {json.dumps(file_stats)}")
    n_clip = windows.clip_frame_count(1 + 32000 // audio.HOP)
    assert abs(file_stats["generated"] - n_clip) <= 2, file_stats
    assert file_stats["idleAfter"] > 0 and file_stats["source"] is None
    assert file_stats["error"] is None and math.isfinite(file_stats["e2eMs"])
    target = os.environ.get("WEB_PREVIEW_PNG")
    if target:
        shutil.copyfile(shot, target)


async def devtools_page(
    proc: subprocess.Popen, profile: Path, port: int, http: aiohttp.ClientSession
) -> str:
    """The DevTools WebSocket URL of Chromium's page on the gateway's `port` (bounded:
    60 s for Chromium to start and open it)."""
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (active.exists() and active.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"chromium did not start (exit {proc.poll()})")
        await asyncio.sleep(0.1)
    devtools_port = int(active.read_text().split()[0])
    while True:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as resp:
            targets = await resp.json()
        page = next((t for t in targets if t["type"] == "page" and f":{port}/" in t["url"]), None)
        if page is not None:
            return page["webSocketDebuggerUrl"]
        if time.monotonic() > deadline:
            pytest.fail(f"no page target: {targets}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def page_devtools(
    proc: subprocess.Popen, profile: Path, port: int
) -> AsyncIterator[DevTools]:
    """DevTools on Chromium's page of the gateway on `port`, once the page has its
    avatar list (bounded: 60 s to start, 30 s for the list)."""
    async with aiohttp.ClientSession() as http:
        page_url = await devtools_page(proc, profile, port, http)
        async with http.ws_connect(page_url, max_msg_size=0) as ws:
            cdp = DevTools(ws)
            await cdp.call("Runtime.enable")
            await cdp.until("window.lipsyncStats && window.lipsyncStats.modelsLoaded", 30)
            yield cdp


async def drive_page(
    proc: subprocess.Popen, profile: Path, port: int, tmp_path: Path, clip: Path
) -> tuple[dict[str, Any], dict[str, Any], Path, list[str]]:
    async with page_devtools(proc, profile, port) as cdp:
        assert await cdp.eval("document.getElementById('model').value") == "alice"
        await cdp.eval("document.getElementById('mic').click(), true")
        await cdp.until(
            "(s => s.distinctGeneratedFrames >= 8 && s.framesShown >= 50"
            " && s.e2eMs !== null)(window.lipsyncStats)",
            60,
        )
        await asyncio.sleep(1.0)
        stats = await cdp.eval(STATS)
        shot = await cdp.call("Page.captureScreenshot", format="png")
        png = tmp_path / "web_preview.png"
        png.write_bytes(base64.b64decode(shot["data"]))
        await cdp.eval("document.getElementById('stop').click(), true")
        with contextlib.suppress(TimeoutError):
            await cdp.until("window.lipsyncStats.state === 'closed'", 15)
        stats["closedAfterStop"] = await cdp.eval("window.lipsyncStats.state")

        before = await cdp.eval(STATS)
        doc = await cdp.call("DOM.getDocument")
        node = await cdp.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
        await cdp.call("DOM.setFileInputFiles", files=[str(clip)], nodeId=node["nodeId"])
        await cdp.until("window.lipsyncStats.source !== null", 20)
        await cdp.until(  # the file was streamed, its clip ended, the avatar idles again
            f"(s => s.source === null && s.idleFrames >= {before['idleFrames']} + 10"
            f" && s.generatedFrames > {before['generatedFrames']})(window.lipsyncStats)",
            30,
        )
        await asyncio.sleep(0.5)
        after = await cdp.eval(STATS)
        file_stats = {
            "generated": after["generatedFrames"] - before["generatedFrames"],
            "idleAfter": after["idleFrames"] - before["idleFrames"],
            "source": after["source"],
            "state": after["state"],
            "error": after["error"],
            "e2eMs": after["e2eMs"],
        }
        return stats, file_stats, png, cdp.console
