"""`lipsync-avatar`: convert SyncTalk_2D checkpoints, import SyncTalk_2D avatars, and
make an avatar's int8 UNet for the CPU.

    lipsync-avatar convert --unet CKPT [--audio-encoder ENC] --out DIR [--no-verify]
    lipsync-avatar import-synctalk --dataset DIR --unet CKPT [--audio-encoder ENC] \\
        --name NAME --out AVATARS_DIR [--link-frames] [--overwrite] [--no-verify]
    lipsync-avatar quantize AVATAR_DIR [--samples N] [--activation-type quint8|qint8] \\
        [--reduce-range] [--keep-float first,last] [--audio-encoder ENC]

Expected errors (bad checkpoints, datasets, names, missing torch, an int8 model that
fails its check) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lipsync.avatars.convert import ConvertReport

PROG = "lipsync-avatar"
EXIT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    from lipsync.avatars.quantize.options import ACTIVATION_TYPES, CALIBRATIONS, QuantizeOptions

    qd = QuantizeOptions()
    p = argparse.ArgumentParser(
        prog=PROG, description="Convert and import SyncTalk_2D avatars for lip-sync serving."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "convert",
        help="convert SyncTalk_2D .pth checkpoints to unet.onnx / audio_encoder.onnx",
        description="Convert a SyncTalk_2D UNet checkpoint (and the audio encoder) to ONNX "
        "and verify ONNX Runtime against PyTorch (max abs difference <= 1e-4).",
    )
    c.add_argument(
        "--unet",
        required=True,
        type=Path,
        metavar="CKPT",
        help="UNet checkpoint <epoch>.pth (or its folder: highest epoch wins)",
    )
    c.add_argument(
        "--audio-encoder",
        type=Path,
        metavar="ENC",
        help="audio encoder checkpoint (audio_visual_encoder.pth)",
    )
    c.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    c.add_argument(
        "--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check"
    )

    i = sub.add_parser(
        "import-synctalk",
        help="import a trained SyncTalk_2D avatar as an avatar package",
        description="Build <AVATARS_DIR>/<NAME>/ (avatar.yaml, ONNX models, frames, crop "
        "rects) from a SyncTalk_2D dataset folder and its checkpoints.",
    )
    i.add_argument(
        "--dataset",
        required=True,
        type=Path,
        metavar="DIR",
        help="dataset/<name> folder with full_body_img/ and landmarks/",
    )
    i.add_argument(
        "--unet",
        required=True,
        type=Path,
        metavar="CKPT",
        help="UNet checkpoint <epoch>.pth (or its folder: highest epoch wins)",
    )
    i.add_argument(
        "--audio-encoder",
        type=Path,
        metavar="ENC",
        help="audio encoder checkpoint (audio_visual_encoder.pth)",
    )
    i.add_argument("--name", required=True, help="avatar name (the API's model_id)")
    i.add_argument(
        "--out", required=True, type=Path, metavar="AVATARS_DIR", help="avatars root folder"
    )
    i.add_argument(
        "--link-frames", action="store_true", help="hard-link the frames instead of copying them"
    )
    i.add_argument(
        "--overwrite", action="store_true", help="replace an existing package of that name"
    )
    i.add_argument(
        "--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check"
    )

    q = sub.add_parser(
        "quantize",
        help="make the avatar's int8 UNet for the CPU (unet.int8.onnx)",
        description="Quantize the avatar's UNet to int8 (ONNX Runtime static quantization, "
        "QDQ, per-channel weights), calibrated on the avatar's own face crops and "
        "speech-like audio through the audio encoder; check it against float32 (mouth-"
        "region PSNR) and write unet.int8.onnx, unet.int8.json (the calibration record) "
        "and unet.int8.check.npz into the package if the check passes. Served when "
        "inference.cpu_precision (or avatar.yaml cpu_precision) is int8.",
    )
    q.add_argument("avatar", type=Path, metavar="AVATAR_DIR", help="the avatar package folder")
    q.add_argument("--samples", type=int, default=32, help="calibration frames (default 32)")
    q.add_argument(
        "--check-frames", type=int, default=8, help="frames of the check (default 8; 1-64)"
    )
    q.add_argument(
        "--activation-type",
        choices=ACTIVATION_TYPES,
        default=qd.activation_type,
        help=f"activations' int8 type (default {qd.activation_type})",
    )
    q.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI)")
    q.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default=qd.calibration,
        help=f"how activation ranges are calibrated (default {qd.calibration})",
    )
    q.add_argument(
        "--op-types",
        default="auto",
        metavar="OPS",
        help="operators to quantize, comma-separated, or 'all' (ONNX Runtime's set); "
        "default auto: Conv,Relu,LeakyRelu,Resize,Concat, else without Concat if that "
        "fails the check",
    )
    q.add_argument(
        "--keep-float",
        default="",
        metavar="first,last",
        help="convolutions to leave in float: first, last or both",
    )
    q.add_argument(
        "--audio-encoder",
        type=Path,
        metavar="ENC",
        help="audio_encoder.onnx, for an avatar without its own",
    )
    q.add_argument(
        "--min-psnr",
        type=float,
        default=38.0,
        help="mean PSNR bound, dB (38; the inference service checks again "
        "against inference.int8_min_mean_psnr_db)",
    )
    q.add_argument(
        "--min-worst-psnr", type=float, default=32.0, help="worst-frame PSNR bound, dB (32)"
    )
    q.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    return p


def _print_report(report: ConvertReport) -> None:
    for path in report.files:
        size = path.stat().st_size / 2**20 if path.exists() else 0.0
        print(f"wrote {path} ({size:.1f} MiB)")
    if report.verified:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_diffs.items())
        print(f"max abs difference, ONNX Runtime vs PyTorch (batch 2, random inputs): {diffs}")
        tol = f"{report.tolerance:.0e}".replace("e-0", "e-").replace("e+0", "e+")
        print(f"verified: ONNX Runtime matches PyTorch within {tol}")
    else:
        print("not verified (--no-verify)")


def _convert(args: argparse.Namespace) -> None:
    from lipsync.avatars.convert import convert_checkpoints, resolve_unet_checkpoint

    unet = resolve_unet_checkpoint(args.unet)
    print(f"converting {unet}" + (f" and {args.audio_encoder}" if args.audio_encoder else ""))
    report = convert_checkpoints(unet, args.audio_encoder, args.out, verify=not args.no_verify)
    _print_report(report)
    if args.audio_encoder is None:
        print("no audio encoder given: only unet.onnx written")


def _import(args: argparse.Namespace) -> None:
    from lipsync.avatars.synctalk_import import import_synctalk

    print(f"importing {args.dataset} as avatar {args.name!r} into {args.out}")
    res = import_synctalk(
        args.dataset,
        args.unet,
        args.audio_encoder,
        args.name,
        args.out,
        link_frames=args.link_frames,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    _print_report(res.convert)
    how = f"{res.linked} hard-linked, {res.frames - res.linked} copied"
    w, h = res.frame_size
    print(f"wrote {res.folder / 'frames'}/ ({res.frames} frames, {w}x{h}; {how})")
    print(f"wrote {res.folder / 'crop_rects.json'} ({res.frames} rects)")
    print(f"wrote {res.folder / 'avatar.yaml'}")
    if res.convert.audio_encoder_path is None:
        print("note: no audio encoder given; the package has no audio_encoder.onnx")
    print(f"avatar {args.name!r} ready: {res.folder}")


def _op_types(arg: str) -> tuple[str, ...] | None:
    if arg == "auto":
        return None
    return () if arg == "all" else tuple(o for o in arg.split(",") if o)


def _quantize(args: argparse.Namespace) -> None:
    from lipsync.avatars.quantize.build import describe, quantize_avatar
    from lipsync.avatars.quantize.check import QualityBounds
    from lipsync.avatars.quantize.options import QuantizeError, QuantizeOptions

    opts = QuantizeOptions(
        samples=args.samples,
        check_frames=args.check_frames,
        activation_type=args.activation_type,
        reduce_range=args.reduce_range,
        keep_float=tuple(k for k in args.keep_float.split(",") if k),
        calibration=args.calibration,
        op_types=_op_types(args.op_types),
        bounds=QualityBounds(args.min_psnr, args.min_worst_psnr),
        audio_encoder=args.audio_encoder,
        threads=args.threads,
    )
    print(f"quantizing the UNet of {args.avatar} ({opts.samples} calibration frames)")
    report = quantize_avatar(args.avatar, opts)
    print(describe(report))
    mib = 2**20
    if report.int8_path is None:
        raise QuantizeError(
            f"the int8 model failed its check, nothing written ({report.check.describe()}); "
            "try --keep-float first,last, --activation-type qint8 or more --samples"
        )
    print(
        f"wrote {report.int8_path} ({report.int8_bytes / mib:.2f} MiB; float "
        f"{report.float_bytes / mib:.2f} MiB), unet.int8.json and unet.int8.check.npz"
    )
    print("served when inference.cpu_precision or avatar.yaml cpu_precision is int8")


def _expected_errors() -> tuple[type[BaseException], ...]:
    from lipsync.avatars.convert import ConvertError
    from lipsync.avatars.nets.onnx_builder import StateDictError
    from lipsync.avatars.package import AvatarError, UnknownModelError
    from lipsync.avatars.quantize.options import QuantizeError
    from lipsync.avatars.synctalk_import import DatasetError

    return (
        ConvertError,
        DatasetError,
        AvatarError,
        UnknownModelError,
        StateDictError,
        QuantizeError,
        OSError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        expected = _expected_errors()
    except ImportError as exc:  # e.g. onnx not installed
        print(f"{PROG}: error: {exc} (pip install -e '.[convert]')", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.command == "convert":
            _convert(args)
        elif args.command == "quantize":
            _quantize(args)
        else:
            _import(args)
    except expected as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"{PROG}: error: {' '.join(msg.split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
