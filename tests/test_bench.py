"""`make bench` end to end on a tiny run: the real bench avatar (reference-size networks),
both services as processes, and the figures the issue asks of out/bench.json."""

from __future__ import annotations

import json
import math
import statistics

from benchmarks import h264, run


def test_bench_writes_every_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the bench avatar and out/ go under tmp_path
    out = tmp_path / "bench.json"
    argv = ["--clients", "1,2", "--requests", "1", "--batch-size", "2"]
    argv += ["--unet-batches", "1,2", "--reference-frames", "2", "--out", str(out)]
    argv += ["--int8-clients", "1", "--int8-samples", "4"]
    assert run.main(argv) == 0
    r = json.loads(out.read_text())
    printed = capsys.readouterr().out

    def positive(x: float) -> bool:
        return isinstance(x, float) and math.isfinite(x) and x > 0

    assert positive(r["unet_ceiling_fps"]) and positive(r["reference_loop_fps"])
    assert set(r["e2e_fps"]) == {"1", "2"} and all(map(positive, r["e2e_fps"].values()))
    best = r["unet_fps_by_batch"][str(r["unet_best_batch"])]
    assert best == max(r["unet_fps_by_batch"].values())
    # the ceiling: that batch's median measurement, in the table and around each e2e run
    ceilings = r["unet_ceiling_measurements_fps"]
    assert len(ceilings) == 1 + 1 + 2 and ceilings[0] == best
    assert r["unet_ceiling_fps"] == statistics.median(ceilings)
    around = r["e2e"]["2"]["ceiling_around_fps"]
    assert around == ceilings[2:4] and r["e2e"]["1"]["ceiling_around_fps"] == ceilings[1:3]
    assert r["ratio_e2e_to_ceiling"] == r["e2e_fps"]["2"] / max(around)
    stages = r["stages_ms_per_frame"]
    for stage in ("mel", "audio_encoder", "unet", "crop", "paste_720p", "paste_1080p"):
        assert positive(stages[stage]), stage
    for stage in ("jpeg_720p", "jpeg_1080p", "transfer_float32", "transfer_uint8", "transfer_e2e"):
        assert positive(stages[stage]), stage
    for e in r["e2e"].values():
        assert e["p50_ms"] <= e["p95_ms"] and e["frames"] > 0
    assert r["reference_loop_kind"] in r["reference_loops_fps"]
    for name in ("synthetic_720p", "demo_720p"):  # H.264 beside JPEG (benchmarks/h264.py)
        c = r["h264_720p"][name]
        assert positive(c["h264_ms_per_frame"]) and positive(c["jpeg_region_ms_per_frame"])
        assert c["h264_streams_per_core"] == 1000 / (25 * c["h264_ms_per_frame"])
        assert 0 < c["h264_bytes_per_frame"] < c["jpeg_bytes_per_frame"], name
    assert f"H.264 streams (libx264 {r['h264']['preset']}" in printed
    assert "ceiling (UNet alone, best batch" in printed
    assert f"{r['unet_ceiling_fps']:.2f} frames/s" in printed
    # int8 (issue 20): the quantized UNet alone and end to end, beside float32
    q = r["int8"]
    assert q["served"] == "int8", q["served_note"]
    assert q["unet_speedup_best"] == max(q["unet_fps_by_batch"].values()) / max(
        q["unet_fps_by_batch_fp32_same_time"].values()
    )
    assert set(q["unet_fps_by_batch"]) == {"1", "2"} and positive(q["unet_ceiling_fps"])
    assert all(map(positive, q["unet_fps_by_batch_fp32_same_time"].values()))
    c = q["unet_cpu_ms_per_frame_batch1"]
    assert positive(c["float32"]) and positive(c["int8"])
    assert q["unet_speedup_cpu_time"] == c["float32"] / c["int8"]
    assert set(q["e2e_fps"]) == {"1"} and positive(q["e2e_fps"]["1"])
    assert q["ratio_e2e_int8_to_float32"]["1"] == q["e2e_fps"]["1"] / r["e2e_fps"]["1"]
    assert q["ratio_ceiling_int8_to_float32"] == q["unet_ceiling_fps"] / r["unet_ceiling_fps"]
    assert "int8 UNet (QDQ" in printed and "served as: int8;" in printed


def test_h264_bench_without_services(tmp_path, capsys):
    out = tmp_path / "h264.json"
    argv = ["--frames", "6", "--presets", "ultrafast", "--no-services", "--out", str(out)]
    assert h264.main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["cost"]) == {"synthetic_720p", "demo_720p"}
    assert r["quality"] is None and r["frames"] == 6
    assert "demo_720p      ultrafast" in capsys.readouterr().out
