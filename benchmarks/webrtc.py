"""WebRTC against the WebSocket fallback, on loopback, with the real services and gateway
as child processes (docs/DELIVERY.md):

- speech in -> mouth out: for every generated frame of a clip, from the moment the viewer
  emitted the audio that frame shows (clip time 40 ms x frame) to the moment the frame
  is complete at the viewer, before decoding (WebRTC: the arrival of its last RTP packet,
  the one with the marker bit; WebSocket: the arrival of its message), p50 / p95 over all
  of them. Decoding then takes a few ms either way (H.264 or JPEG);
- A/V offset at the receiver (WebRTC): when a frame's own sound arrives (its RTP packet;
  the sound is found by correlating the returned audio with the speech sent) minus when
  its picture is complete: what a browser's lip sync starts from;
- CPU per viewer: the gateway process's CPU seconds per wall second, divided by the
  viewers, with 1 and with N silent viewers (idle frames: the gateway's work per frame is
  the same as for speech frames; the model's is not, and is measured elsewhere);
- memory: the gateway's resident set after each of R rounds of N viewers connecting,
  streaming and leaving (bounded: R rounds of S seconds).

The viewers run in this process (aiortc decodes their video in Python's threads): on a
small machine they fall behind before the gateway does, so the frame rate the gateway
sent is given beside the one decoded here.

`python -m benchmarks.webrtc [--model demo | --tiny] [--viewers 8] [--rounds 3]`; writes
out/webrtc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.bench_avatar import use_tiny_avatar
from benchmarks.run import cpu_name
from benchmarks.webrtc_viewer import CHUNK, RATE, Viewer
from lipsync.avatars.speech_signal import speech_like
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import free_port
from lipsync.web.webrtc_session import PREROLL_S
from lipsync.web.ws_protocol import unpack_frame

LEAD_S = 1.0  # silence before the speech (the session idles)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def encoder_cost(frames_dir: Path, n: int = 100) -> dict[str, float]:
    """CPU ms per frame of the gateway's JPEG -> H.264 fallback (JpegToH264) on the
    avatar's own frames, one thread: what passthrough saves per viewer and frame."""
    import cv2  # the frames may be PNG: JPEG them as the compositing service would

    from lipsync.web.webrtc_media import JpegToH264

    paths = sorted(frames_dir.iterdir())[:25]
    jpegs = [
        cv2.imencode(".jpg", cv2.imread(str(p)), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        for p in paths
    ]
    enc = JpegToH264()
    enc.encode(jpegs[0], 0.0, True)
    c0 = time.process_time()
    size = 0
    for i in range(1, n + 1):
        size += len(enc.encode(jpegs[i % len(jpegs)], 40.0 * i, False))
    return {
        "cpu_ms_per_frame": (time.process_time() - c0) * 1000 / n,
        "kbit_per_s_at_25fps": size * 8 / n * 25 / 1000,
        "jpeg_kbit_per_s_at_25fps": sum(map(len, jpegs)) / len(jpegs) * 8 * 25 / 1000,
        "width": enc.size[0] if enc.size else 0,
        "height": enc.size[1] if enc.size else 0,
    }


def emit_time(v: Viewer, sample: int) -> float | None:
    k = sample // CHUNK
    if v.mic is None or k >= len(v.mic.emitted):
        return None
    return v.mic.emitted[k] + (sample % CHUNK) / RATE


async def webrtc_trial(base: str, model: str, speech: np.ndarray) -> dict[str, Any]:
    lead = int(LEAD_S * RATE)
    signal = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(RATE * 3, np.float32)])
    v = Viewer(base, model, signal, keep_frames=False)
    async with aiohttp.ClientSession() as http:
        await v.connect(http)
        await asyncio.sleep(len(signal) / RATE)
        await v.close()
    clip_start = lead - int(PREROLL_S * RATE)  # the gateway's silence gate keeps a pre-roll
    e2e, av_offset = [], []
    pairs = v.matched()
    # where the returned sound of the speech begins in what the viewer received
    received = np.concatenate([a for _, a in v.audio]) if v.audio else np.zeros(0)
    # decoded audio chunk k is the k-th packet that arrived (loopback: none lost)
    arrived = list(v.audio_arrived.values())
    arrival = (
        np.concatenate([np.full(len(a), arrived[k]) for k, (_, a) in enumerate(v.audio)])
        if v.audio and len(arrived) >= len(v.audio)
        else None
    )
    lag = None
    if len(received) > len(speech):
        ref = speech[: RATE * 2]
        n = 1 << int(np.ceil(np.log2(len(received) + len(ref))))
        corr = np.fft.irfft(np.fft.rfft(received, n) * np.conj(np.fft.rfft(ref, n)), n)
        lag = int(np.argmax(corr[: len(received)]))
    for (_, pts, _, _), m in pairs:
        t_pic = v.complete_time(pts)
        if t_pic is None or not m["generated"] or m["clip"] != 0:
            continue
        s = clip_start + m["clip_frame"] * (RATE // 25)
        t_in = emit_time(v, s)
        if t_in is not None:
            e2e.append((t_pic - t_in) * 1000)
        if lag is not None and arrival is not None and m["speech"]:
            i = lag + (s - lead)
            if 0 <= i < len(arrival):
                av_offset.append((arrival[i] - t_pic) * 1000)
    return {
        "e2e_ms": e2e,
        "av_offset_ms": av_offset,
        "frames": len(v.video),
        "matched": len(pairs),
    }


async def websocket_trial(base: str, model: str, speech: np.ndarray) -> dict[str, Any]:
    """The page's WebSocket path: the speech in 20 ms chunks at real time, then
    end_of_audio."""
    e2e = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{base}/ws") as ws:
        await ws.send_json({"type": "start", "model": model, "sample_rate": RATE})
        started = asyncio.Event()
        emitted: list[float] = []
        done = asyncio.Event()

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    if json.loads(msg.data).get("type") == "started":
                        started.set()
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    now = time.time()
                    head = unpack_frame(msg.data)[0]
                    if head["generated"] and head["clip"] == 0:
                        k = head["clip_frame"] * (RATE // 25)
                        if k // CHUNK < len(emitted):
                            e2e.append((now - emitted[k // CHUNK] - (k % CHUNK) / RATE) * 1000)
            done.set()

        reader = asyncio.create_task(read())
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(LEAD_S)
        t0 = time.monotonic()
        for i in range(0, len(speech), CHUNK):
            wait = t0 + i / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            emitted.append(time.time())
            await ws.send_bytes(speech[i : i + CHUNK].astype("<f4").tobytes())
        await ws.send_json({"type": "end_of_audio"})
        await asyncio.sleep(2.0)
        await ws.send_json({"type": "stop"})
        await asyncio.wait_for(done.wait(), 30)
        await reader
    return {"e2e_ms": e2e}


async def load_round(base: str, model: str, n: int, seconds: float, pid: int) -> dict:
    """n viewers at once for `seconds`: CPU of the gateway. The viewers are silent (the
    avatar idles): the gateway's work per frame is the same for idle and speech frames,
    and a 2-core machine cannot run the model for 8 talking viewers besides."""
    silence = np.zeros(int((seconds + 5) * RATE), np.float32)
    viewers = [Viewer(base, model, silence, keep_frames=False) for _ in range(n)]
    async with aiohttp.ClientSession() as http:
        for v in viewers:
            await v.connect(http)
        await asyncio.sleep(2.0)  # connected and streaming
        c0, t0 = proc_cpu_s(pid), time.monotonic()
        frames0 = sum(len(v.video) for v in viewers)
        sent0 = sum(len(v.frames_meta()) for v in viewers)
        await asyncio.sleep(seconds)
        c1, t1 = proc_cpu_s(pid), time.monotonic()
        frames = sum(len(v.video) for v in viewers) - frames0
        sent = sum(len(v.frames_meta()) for v in viewers) - sent0
        for v in viewers:
            await v.close()
    return {
        "viewers": n,
        "gateway_cpu_per_viewer": (c1 - c0) / (t1 - t0) / n,
        "sent_fps_per_viewer": sent / (t1 - t0) / n,  # handed to aiortc by the gateway
        "fps_per_viewer": frames / (t1 - t0) / n,  # decoded by the viewers (this process)
    }


async def wait_no_peers(base: str, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
            line = next(x for x in text.splitlines() if x.startswith("lipsync_gateway_webrtc"))
            if float(line.split()[-1]) == 0:
                return time.monotonic()
            await asyncio.sleep(0.2)
    raise TimeoutError("WebRTC sessions did not end")


async def bench(base: str, model: str, args: argparse.Namespace, pid: int) -> dict:
    speech = speech_like(args.speech_s, sr=RATE, seed=3)
    await webrtc_trial(base, model, speech_like(1.0, sr=RATE, seed=1))  # warm up
    await wait_no_peers(base)
    rtc: dict[str, list[float]] = {"e2e_ms": [], "av_offset_ms": []}
    ws: list[float] = []
    for _ in range(args.trials):  # alternated, so load changes hit both alike
        r = await webrtc_trial(base, model, speech)
        rtc["e2e_ms"] += r["e2e_ms"]
        rtc["av_offset_ms"] += r["av_offset_ms"]
        await wait_no_peers(base)
        ws += (await websocket_trial(base, model, speech))["e2e_ms"]
    cpu = [await load_round(base, model, 1, args.round_s, pid)]
    await wait_no_peers(base)
    rss = [proc_rss_mb(pid)]
    for _ in range(args.rounds):
        cpu.append(await load_round(base, model, args.viewers, args.round_s, pid))
        await wait_no_peers(base)
        await asyncio.sleep(1.0)
        rss.append(proc_rss_mb(pid))
    return {
        "webrtc_e2e_ms": {
            "p50": pct(rtc["e2e_ms"], 50),
            "p95": pct(rtc["e2e_ms"], 95),
            "n": len(rtc["e2e_ms"]),
        },
        "websocket_e2e_ms": {"p50": pct(ws, 50), "p95": pct(ws, 95), "n": len(ws)},
        "av_offset_ms": {
            "median": pct(rtc["av_offset_ms"], 50),
            "p5": pct(rtc["av_offset_ms"], 5),
            "p95": pct(rtc["av_offset_ms"], 95),
            "n": len(rtc["av_offset_ms"]),
        },
        "cpu": cpu,
        "gateway_rss_mb_after_rounds": rss,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.webrtc", description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tiny", action="store_true", help="the small test avatar (256x224)")
    ap.add_argument("--speech-s", type=float, default=4.0)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--viewers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-s", type=float, default=15.0)
    ap.add_argument("--out", default="out/webrtc.json")
    args = ap.parse_args(argv)
    env = dict(os.environ, LIPSYNC_LOG_LEVEL="WARNING")
    model = use_tiny_avatar(env, "webrtc-bench-") if args.tiny else args.model
    avatars = Path(env.get("AVATARS_DIR", "avatars"))
    encoder = encoder_cost(avatars / model / "frames")
    web_port = free_port()
    with ServiceProcesses(
        env=env,
        inference_port=free_port(),
        compositing_port=free_port(),
        web_port=web_port,
        quiet=True,
    ) as services:
        gateway_pid = services.procs[-1].pid
        result = asyncio.run(bench(f"http://127.0.0.1:{web_port}", model, args, gateway_pid))
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "command": "python -m benchmarks.webrtc " + " ".join(argv or []),
        "model": model,
        "fallback_encoder": encoder,
        **result,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    r, w, a = report["webrtc_e2e_ms"], report["websocket_e2e_ms"], report["av_offset_ms"]
    print(f"\n== WebRTC vs WebSocket, {report['date']}, {report['machine']}, model {model} ==")
    print(f"speech in -> mouth out  WebRTC    p50 {r['p50']:.0f} ms  p95 {r['p95']:.0f} ms")
    print(f"                        WebSocket p50 {w['p50']:.0f} ms  p95 {w['p95']:.0f} ms")
    print(
        f"A/V offset (sound arrival - picture complete): median {a['median']:.0f} ms, "
        f"p5..p95 {a['p5']:.0f}..{a['p95']:.0f} ms"
    )
    for c in report["cpu"]:
        print(
            f"{c['viewers']} viewer(s): gateway CPU {100 * c['gateway_cpu_per_viewer']:.1f} % "
            f"of a core per viewer; sent {c['sent_fps_per_viewer']:.1f} fps each, decoded "
            f"{c['fps_per_viewer']:.1f} fps each here"
        )
    e = report["fallback_encoder"]
    print(
        f"JPEG -> H.264 fallback at {e['width']}x{e['height']}: {e['cpu_ms_per_frame']:.1f} ms "
        f"CPU a frame; {e['kbit_per_s_at_25fps']:.0f} kbit/s at 25 fps (the JPEGs: "
        f"{e['jpeg_kbit_per_s_at_25fps']:.0f} kbit/s)"
    )
    rss = ", ".join(f"{x:.0f}" for x in report["gateway_rss_mb_after_rounds"])
    print(f"gateway RSS (MB) before and after each round of {args.viewers} viewers: {rss}")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
