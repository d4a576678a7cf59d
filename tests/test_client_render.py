"""The Python client (`lipsync.client`), the MP4/JPEG writers (`lipsync.client.media`), the
`lipsync-render` CLI and the demo, against both services on ephemeral ports."""

from __future__ import annotations

import socket
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import soundfile as sf

from lipsync.cli import render as render_cli
from lipsync.client import LipsyncClient, LipsyncError, clip_frames, load_audio, to_pcm16
from lipsync.client.media import MediaError, probe, write_jpeg_folder, write_mp4
from lipsync.core.windows import clip_frame_count
from lipsync.local.ports import free_port
from tests import reference_impl as ref
from tests.avatar_factory import speech_like
from tests.oracle import decode_jpeg

SR = 16000


@pytest.fixture(scope="module")
def client(services):
    with LipsyncClient(services.address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return speech_like(1.5, seed=11)  # 24000 samples: T = 121, 36 frames


@pytest.fixture(scope="module")
def clip_wav(tmp_path_factory, clip) -> Path:
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    sf.write(str(path), to_pcm16(clip), SR, subtype="PCM_16")  # exactly what render() sends
    return path


@pytest.fixture(scope="module")
def progress_calls() -> list[tuple[int, int]]:
    return []


@pytest.fixture(scope="module")
def rendered(client, clip, progress_calls) -> list[bytes]:
    """The clip rendered in batches of 10 (two requests in flight), from background 3."""
    return list(
        client.render(
            "alice",
            clip,
            batch_size=10,
            start_frame_idx=3,
            mode="batch",
            on_progress=lambda d, t: progress_calls.append((d, t)),
        )
    )


def test_stream_mode_render_equals_batch_mode(client, clip, rendered):
    calls = []
    streamed = list(
        client.render(
            "alice", clip, start_frame_idx=3, on_progress=lambda d, t: calls.append((d, t))
        )
    )
    assert len(streamed) == len(rendered)
    for a, b in zip(streamed, rendered, strict=True):
        diff = np.abs(decode_jpeg(a).astype(int) - decode_jpeg(b).astype(int)).max()
        assert diff <= 2
    assert calls[-1] == (len(rendered), len(rendered))


# -- client ---------------------------------------------------------------------------------
def test_health_and_list_models(client):
    h = client.health()
    assert h.healthy and h.inference_server_healthy
    names = {m.model_id for m in client.list_models()}
    assert {"alice", "bob"} <= names


def test_load_unload_and_stats(client):
    assert client.load_model("bob") >= 0
    stats = client.model_stats("bob").stats
    assert [s.model_id for s in stats] == ["bob"] and stats[0].loaded
    assert {s.model_id for s in client.model_stats().stats} >= {"bob"}
    assert client.unload_model("bob")
    assert not client.model_stats("bob").stats[0].loaded
    with pytest.raises(LipsyncError, match="nobody") as err:
        client.load_model("nobody")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_composite_batch(client, clip):
    res = client.composite_batch("alice", 4, audio=clip, start_frame_idx=5, clip_frame_offset=2)
    assert len(res.frames) == 4
    assert res.background_frame_indices == [ref.ref_pingpong(5 + k, 7) for k in range(4)]
    assert decode_jpeg(res.frames[0]).shape == (224, 256, 3)
    assert res.total_time_ms > 0 and res.stage_times_ms


@pytest.mark.parametrize(
    ("model", "batch", "needle"),
    [("nobody", 4, "unknown model"), ("alice", 0, "batch_size"), ("alice", 1000, "batch_size")],
)
def test_composite_batch_errors_raise(client, clip, model, batch, needle):
    with pytest.raises(LipsyncError, match=needle) as err:
        client.composite_batch(model, batch, audio=clip)
    assert err.value.code is None  # the service answered success=false


def test_unreachable_server_is_a_lipsync_error():
    with (
        LipsyncClient(f"127.0.0.1:{free_port()}", timeout_s=5) as c,
        pytest.raises(LipsyncError, match="cannot reach"),
    ):
        c.health()


def test_render_gives_every_frame_in_order(client, clip, rendered, progress_calls):
    total = clip_frame_count(1 + clip.size // 200)
    assert total == clip_frames(clip.size) == 36
    assert len(rendered) == total
    assert progress_calls == [(10, total), (20, total), (30, total), (36, total)]
    # The same frames as single requests cut differently (the clip sent the same way).
    pcm = to_pcm16(clip)
    single: list[bytes] = []
    for offset, size in ((0, 17), (17, 19)):
        single += client.composite_batch(
            "alice", size, audio=pcm, start_frame_idx=3 + offset, clip_frame_offset=offset
        ).frames
    assert len(single) == total
    for k, (a, b) in enumerate(zip(rendered, single, strict=True)):
        diff = np.abs(decode_jpeg(a).astype(int) - decode_jpeg(b).astype(int)).max()
        assert diff <= 2, f"frame {k} differs by {diff}"
    # ... and not the same frames shifted by one
    shifted = np.abs(decode_jpeg(rendered[5]).astype(int) - decode_jpeg(single[6]).astype(int))
    assert shifted.max() > 2


def test_render_pads_short_audio(client):
    frames = list(client.render("alice", speech_like(0.05, seed=2), batch_size=8))
    assert len(frames) == clip_frame_count(16) == 4


def test_render_error_raises(client, clip):
    with pytest.raises(LipsyncError, match="unknown model"):
        list(client.render("nobody", clip))


# -- audio files ----------------------------------------------------------------------------
def test_load_audio_wav_44k1_stereo_int16(tmp_path):
    sig = speech_like(1.0, sr=44100, seed=4)
    left = (sig * 32767).astype(np.int16)
    right = (0.5 * sig * 32767).astype(np.int16)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    audio, seconds = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == int(np.ceil(44100 * 16000 / 44100))
    assert seconds == pytest.approx(1.0, abs=1e-3)
    import soxr

    mono = (left.astype(np.float32) / 32768 + right.astype(np.float32) / 32768) / 2
    expected = soxr.resample(mono, 44100, 16000, quality="HQ")[: audio.size]
    np.testing.assert_allclose(audio[: expected.size], expected, atol=1e-5)


def test_load_audio_flac(tmp_path, clip):
    path = tmp_path / "clip.flac"
    sf.write(str(path), clip, SR, subtype="PCM_16")
    audio, seconds = load_audio(path)
    assert seconds == pytest.approx(1.5)
    np.testing.assert_allclose(audio, clip, atol=1.0 / 32768 + 1e-7)


def test_load_audio_mp3(tmp_path, clip_wav):
    import subprocess

    from lipsync.client.media import ffmpeg_exe

    mp3 = tmp_path / "clip.mp3"
    subprocess.run(
        [
            ffmpeg_exe(),
            "-loglevel",
            "error",
            "-i",
            str(clip_wav),
            "-ar",
            "44100",
            "-c:a",
            "libmp3lame",
            "-b:a",
            "128k",
            str(mp3),
        ],
        check=True,
    )
    audio, seconds = load_audio(mp3)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert seconds == pytest.approx(1.5, abs=0.1)  # mp3 adds encoder padding


def test_load_audio_errors(tmp_path):
    with pytest.raises(LipsyncError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(LipsyncError, match="cannot read"):
        load_audio(bad)


# -- media ----------------------------------------------------------------------------------
def _jpegs(n: int, width: int, height: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.full((height, width, 3), (i * 7) % 256, np.uint8)
        img[: height // 2] = rng.integers(0, 255, (height // 2, width, 3), dtype=np.uint8)
        out.append(cv2.imencode(".jpg", img)[1].tobytes())
    return out


def test_write_mp4_odd_size_and_short_audio(tmp_path):
    out = tmp_path / "odd.mp4"
    # 20 frames = 0.8 s of video, 0.5 s of audio: padded with silence to the video's length
    assert write_mp4(_jpegs(20, 101, 75), speech_like(0.5, seed=1), out) == 20
    info = probe(out)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert (info["width"], info["height"]) == (102, 76)
    assert info["frames"] == 20 and info["fps"] == 25
    assert info["duration"] == pytest.approx(0.8, abs=0.07)


def test_write_mp4_failure_reports_ffmpeg_error(tmp_path):
    out = tmp_path / "bad.mp4"
    with pytest.raises(MediaError, match="ffmpeg failed"):
        write_mp4([b"not a jpeg"] * 3, speech_like(0.5), out)
    assert not out.exists()


def test_write_jpeg_folder(tmp_path):
    frames = _jpegs(3, 32, 24)
    assert write_jpeg_folder(iter(frames), tmp_path / "f") == 3
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "000000.jpg",
        "000001.jpg",
        "000002.jpg",
    ]
    assert (tmp_path / "f" / "000002.jpg").read_bytes() == frames[2]


# -- lipsync-render -------------------------------------------------------------------------
def test_cli_renders_mp4(services, clip_wav, clip, tmp_path, capsys):
    out = tmp_path / "video" / "alice.mp4"
    rc = render_cli.main(
        [
            "--model",
            "alice",
            "--audio",
            str(clip_wav),
            "--out",
            str(out),
            "--server",
            services.address,
            "--batch-size",
            "16",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "36 frames" in stdout
    info = probe(out)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert info["fps"] == 25
    assert info["frames"] == clip_frames(clip.size) == 36
    assert (info["width"], info["height"]) == (256, 224)
    assert info["duration"] == pytest.approx(clip.size / SR, abs=0.1)


def test_cli_renders_jpeg_folder(services, clip_wav, rendered, tmp_path, capsys):
    out = tmp_path / "frames"
    rc = render_cli.main(
        [
            "--model",
            "alice",
            "--audio",
            str(clip_wav),
            "--out",
            f"{out}/",
            "--server",
            services.address,
            "--start-frame",
            "3",
            "-q",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    files = sorted(out.iterdir())
    assert [f.name for f in files[:2]] == ["000000.jpg", "000001.jpg"]
    assert len(files) == len(rendered) == 36
    # the wav holds the clip as the 16-bit PCM render() sends: the same frames
    for k in (0, 7, 35):
        got, want = decode_jpeg(files[k].read_bytes()), decode_jpeg(rendered[k])
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2, k


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("model", "unknown model 'nobody'"),
        ("audio", "audio file not found"),
        ("server", "cannot reach"),
        ("out", "cannot tell"),
    ],
)
def test_cli_expected_errors(services, clip_wav, tmp_path, capsys, case, needle):
    args = {
        "--model": "alice",
        "--audio": str(clip_wav),
        "--out": str(tmp_path / "x.mp4"),
        "--server": services.address,
    }
    if case == "model":
        args["--model"] = "nobody"
    elif case == "audio":
        args["--audio"] = str(tmp_path / "missing.wav")
    elif case == "server":
        args["--server"] = f"127.0.0.1:{free_port()}"
    else:
        args["--out"] = str(tmp_path / "x.avi-ish")
    rc = render_cli.main([*(x for kv in args.items() for x in kv), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()


# -- demo -----------------------------------------------------------------------------------
def test_demo_pick_ports_avoids_busy_ones():
    from lipsync.local.ports import pick_ports, port_free

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        inf, comp = pick_ports(taken, taken)
        assert taken not in (inf, comp) and inf != comp
        assert port_free(inf) and port_free(comp)


def test_demo_end_to_end(avatars_root, tmp_path, monkeypatch, capsys):
    """`python -m lipsync.local.demo` with the synthetic avatar: child services, render, stop."""
    from lipsync.local import demo

    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    monkeypatch.setenv("AVATARS_DIR", str(avatars_root))
    monkeypatch.setenv("LIPSYNC_INFERENCE__PORT", str(free_port()))
    monkeypatch.setenv("LIPSYNC_COMPOSITING__PORT", str(free_port()))
    monkeypatch.setenv("LIPSYNC_INFERENCE__INTRA_OP_THREADS", "1")
    monkeypatch.setenv("LIPSYNC_COMPOSITING__WORKERS", "1")
    monkeypatch.setenv("LIPSYNC_COMPOSITING__FRAME_CACHE__PRELOAD", "[alice]")
    wav = tmp_path / "speech.wav"
    sf.write(str(wav), speech_like(0.5, seed=8), SR, subtype="PCM_16")
    out = tmp_path / "out" / "demo.mp4"
    rc = demo.main(["--model", "alice", "--audio", str(wav), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    n = clip_frames(8000)
    assert f"{n} frames" in captured.out and str(out) in captured.out
    assert probe(out)["frames"] == n


def test_demo_missing_avatar_is_a_clear_error(avatars_root, tmp_path, monkeypatch, capsys):
    from lipsync.local import demo

    monkeypatch.delenv("LIPSYNC_CONFIG", raising=False)
    monkeypatch.setenv("AVATARS_DIR", str(avatars_root))
    rc = demo.main(["--model", "nobody", "--out", str(tmp_path / "d.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "avatar 'nobody' not found" in err and "alice" in err
