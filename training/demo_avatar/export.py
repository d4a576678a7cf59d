"""Export the trained `demo` networks to ONNX and write the avatar manifest.

* ``avatars/demo/audio_encoder.onnx``: ``mel [B, 1, 80, 16]`` -> ``features [B, 512]``
* ``avatars/demo/unet.onnx``: ``input [B, 6, 320, 320]``, ``audio [B, 32, 16, 16]`` ->
  ``output [B, 3, 320, 320]`` in [0, 1] (BGR)
* ``avatars/demo/avatar.yaml``

Both with a dynamic batch axis, opset 17, TorchScript exporter (``dynamo=False``), and
checked against PyTorch with onnxruntime (CPU) before anything is written.

Run: ``.venv/bin/python -m training.demo_avatar.export`` (reads ``<data-dir>/model.pt``).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lipsync.avatars.package import write_manifest
from training.demo_avatar import make_data as md
from training.demo_avatar.train import AudioEncoder, DemoUNet


def _export(module: torch.nn.Module, args: tuple, in_names, out_name: str) -> bytes:
    buf = io.BytesIO()
    axes = {n: {0: "batch"} for n in [*in_names, out_name]}
    torch.onnx.export(
        module,
        args,
        buf,
        input_names=list(in_names),
        output_names=[out_name],
        dynamic_axes=axes,
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return buf.getvalue()


def _check(data: bytes, module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> float:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    return float(np.abs(got - ref).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=Path, default=md.DEFAULT_DATA_DIR)
    ap.add_argument("--out", type=Path, default=md.AVATAR_DIR)
    ap.add_argument("--bench", action="store_true", help="also time the models in onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    ckpt = torch.load(args.data_dir / "model.pt", map_location="cpu")
    enc, unet = AudioEncoder().eval(), DemoUNet().eval()
    enc.load_state_dict(ckpt["encoder"])
    unet.load_state_dict(ckpt["unet"])
    print(
        f"checkpoint: step {ckpt['step']}, img L1(w) {ckpt['img_l1']:.4f}, "
        f"aux mse {ckpt['aux_mse']:.4f}"
    )

    rng = np.random.default_rng(0)
    mel = rng.uniform(-4, 4, (3, 1, 80, 16)).astype(np.float32)
    x = rng.uniform(0, 1, (3, 6, 320, 320)).astype(np.float32)
    a = rng.standard_normal((3, 32, 16, 16)).astype(np.float32) * 0.5

    enc_onnx = _export(enc, (torch.from_numpy(mel[:1]),), ["mel"], "features")
    unet_onnx = _export(
        unet, (torch.from_numpy(x[:1]), torch.from_numpy(a[:1])), ["input", "audio"], "output"
    )
    e1 = _check(enc_onnx, enc, {"mel": mel})
    e2 = _check(unet_onnx, unet, {"input": x, "audio": a})
    print(f"onnxruntime vs torch, batch 3: encoder max|diff| {e1:.2e}, unet max|diff| {e2:.2e}")
    assert e1 < 1e-4 and e2 < 1e-4

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audio_encoder.onnx").write_bytes(enc_onnx)
    (args.out / "unet.onnx").write_bytes(unet_onnx)
    write_manifest(args.out, "demo")
    for name in ("audio_encoder.onnx", "unet.onnx"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1e6:.2f} MB)")
    if args.bench:
        bench(args.out, args.threads)


def bench(folder: Path, threads: int = 2, repeats: int = 20) -> None:
    """onnxruntime CPU time per frame of the exported models (median of ``repeats``)."""
    import time

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    unet = ort.InferenceSession(str(folder / "unet.onnx"), opts, providers=["CPUExecutionProvider"])
    enc = ort.InferenceSession(
        str(folder / "audio_encoder.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    for b in (1, 8):
        feeds = {
            "input": rng.uniform(0, 1, (b, 6, 320, 320)).astype(np.float32),
            "audio": rng.standard_normal((b, 32, 16, 16)).astype(np.float32),
        }
        unet.run(None, feeds)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            unet.run(None, feeds)
            ts.append(time.perf_counter() - t)
        print(
            f"unet.onnx, batch {b}, {threads} threads: {np.median(ts) / b * 1e3:.2f} ms/frame "
            f"(min {np.min(ts) / b * 1e3:.2f})"
        )
    mel = rng.uniform(-4, 4, (25, 1, 80, 16)).astype(np.float32)
    enc.run(None, {"mel": mel})
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        enc.run(None, {"mel": mel})
        ts.append(time.perf_counter() - t)
    print(f"audio_encoder.onnx, batch 25: {np.median(ts) / 25 * 1e3:.3f} ms/window")


if __name__ == "__main__":
    main()
