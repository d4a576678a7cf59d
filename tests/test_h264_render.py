"""`lipsync-render --codec h264` and `--push`: the service's H.264 stream written to MP4
as it is (the file's pictures are the stream's access units, not re-encoded), and pushed
live over RTMP to an ffmpeg listening on loopback (imageio-ffmpeg's binary, which the
`render` extra installs)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from lipsync.cli import render as render_cli
from lipsync.client import LipsyncClient, clip_frames, to_pcm16
from lipsync.client.video_out import H264Muxer, VideoOutError, container_format
from lipsync.local.ports import free_port
from lipsync.rpc.h264_units import NAL_IDR, NAL_SLICE, nal_type, nal_units
from tests.avatar_factory import speech_like

SR = 16000


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return speech_like(1.5, seed=12)  # 36 frames


@pytest.fixture(scope="module")
def clip_wav(tmp_path_factory, clip) -> Path:
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    sf.write(str(path), to_pcm16(clip), SR, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def stream_units(services, clip) -> list[bytes]:
    """The clip's H.264 stream as the service sends it (what the render gets too: the
    same composited pictures into a fresh single-threaded encoder, deterministic)."""
    with LipsyncClient(services.address) as client:
        audio = to_pcm16(clip)
        chunks = [audio[i : i + SR] for i in range(0, len(audio), SR)]
        return [f.h264 for f in client.stream("alice", chunks, video_codec="h264")]


def slices(data: bytes, length_prefixed: bool) -> list[bytes]:
    """The coded slices (IDR and non-IDR) of an access unit or an MP4 sample."""
    if length_prefixed:
        units, i = [], 0
        while i < len(data):
            n = int.from_bytes(data[i : i + 4], "big")
            units.append(data[i + 4 : i + 4 + n])
            i += 4 + n
    else:
        units = nal_units(data)
    return [u for u in units if nal_type(u) in (NAL_SLICE, NAL_IDR)]


def video_packets(path: Path) -> tuple[list[bytes], dict]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {
            "width": v.codec_context.width,
            "height": v.codec_context.height,
            "audio": [s.codec_context.name for s in c.streams.audio],
            "rate": float(v.average_rate or 0),
        }
        packets = [bytes(p) for p in c.demux(v) if p.size]
    return packets, info


def render(args: list[str], capsys) -> tuple[int, str]:
    rc = render_cli.main([*args, "-q"])
    err = capsys.readouterr().err
    return rc, err


def test_cli_h264_mp4_is_the_streams_access_units(
    services, clip, clip_wav, stream_units, tmp_path, capsys
):
    out = tmp_path / "v" / "alice.mp4"
    base = ["--model", "alice", "--audio", str(clip_wav), "--server", services.address]
    rc, err = render([*base, "--codec", "h264", "--out", str(out)], capsys)
    assert rc == 0, err
    packets, info = video_packets(out)
    assert len(packets) == len(stream_units) == clip_frames(clip.size) == 36
    assert (info["width"], info["height"], info["rate"]) == (256, 224, 25.0)
    assert info["audio"] == ["aac"]
    # remuxed, not re-encoded: each sample holds the stream's own coded slices
    for k, (sample, au) in enumerate(zip(packets, stream_units, strict=True)):
        assert slices(sample, True) == slices(au, False), k
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 36
        assert c.duration / 1e6 == pytest.approx(clip.size / SR, abs=0.15)


def _listening(port: int) -> bool:
    """Someone listens on 127.0.0.1:port (Linux /proc: a probe connection would use up
    ffmpeg's one `-listen 1` session)."""
    want = f"0100007F:{port:04X}"
    for table in ("/proc/net/tcp",):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return True
    return False


@pytest.fixture
def rtmp_receiver(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp to see the receiver listening")
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/test"
    got = tmp_path / "received.mkv"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error"]
    proc = subprocess.Popen(
        [*cmd, "-listen", "1", "-timeout", "60", "-i", url, "-c", "copy", "-y", str(got)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not _listening(port):
        if proc.poll() is not None:
            pytest.skip(f"this ffmpeg cannot listen for RTMP: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the RTMP receiver did not start listening")
        time.sleep(0.05)
    yield url, got, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_cli_pushes_rtmp_and_records_at_once(
    services, clip_wav, stream_units, rtmp_receiver, tmp_path, capsys
):
    url, got, proc = rtmp_receiver
    out = tmp_path / "live.mkv"
    base = ["--model", "alice", "--audio", str(clip_wav), "--server", services.address]
    rc, err = render([*base, "--push", url, "--out", str(out)], capsys)
    assert rc == 0, err
    assert proc.wait(30) == 0, proc.stderr.read().decode()
    received, info = video_packets(got)
    recorded, _ = video_packets(out)
    # realtime: paced by the service, idle frames first while the first speech frames
    # are made, then the clip's 36; the receiver got what the recording holds
    assert len(received) == len(recorded) >= len(stream_units) == 36
    assert (info["width"], info["height"]) == (256, 224)
    assert info["audio"] == ["aac"]
    for k, (a, b) in enumerate(zip(received, recorded, strict=True)):
        assert slices(a, True) == slices(b, True), k
    with av.open(str(got)) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(received)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--codec", "h264", "--out", "frames/"], "writes a video file"),
        (["--push", "ftp://127.0.0.1/x"], "rtmp(s)://"),
        (["--codec", "h264", "--mode", "batch", "--out", "x.mp4"], "--mode stream"),
        (["--codec", "h264"], "give --out"),
    ],
)
def test_cli_h264_usage_errors(services, clip_wav, tmp_path, capsys, extra, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--model", "alice", "--audio", str(clip_wav), "--server", services.address]
    rc, err = render([*base, *extra], capsys)
    assert rc == 2 and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_push_to_nobody_is_one_line_and_no_file_is_left(services, clip_wav, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    url = f"rtmp://127.0.0.1:{free_port()}/live/x"
    base = ["--model", "alice", "--audio", str(clip_wav), "--server", services.address]
    rc, err = render([*base, "--push", url, "--out", str(out)], capsys)
    assert rc == 2 and "rtmp://127.0.0.1" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_muxer_targets_and_frames_before_a_keyframe(tmp_path, stream_units):
    assert [container_format(t) for t in ("a.mp4", "b.MKV", "c.mov", "rtmp://h/a/k")] == [
        "mp4",
        "matroska",
        "mov",
        "flv",
    ]
    with pytest.raises(VideoOutError, match=r"lipsync\.client\.whip"):
        container_format("https://h/whip/room")
    with pytest.raises(VideoOutError, match="cannot tell"):
        container_format("x.avi")
    out = tmp_path / "late.mp4"
    with H264Muxer(str(out), 25, audio=False) as mux:
        mux.write(0, stream_units[1], False)  # a viewer joined here: no picture to start from
        for k, au in enumerate(stream_units):
            mux.write(k + 1, au, k == 0)
    packets, _ = video_packets(out)
    assert mux.dropped == 1 and mux.frames == len(packets) == len(stream_units)
