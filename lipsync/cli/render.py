"""`lipsync-render`: render a speech clip with an avatar through the compositing service.

    lipsync-render --model NAME --audio FILE --out OUT [--server HOST:PORT]
                   [--codec jpeg|h264] [--push URL ...]
                   [--batch-size 24] [--start-frame 0] [--quiet]
                   [--ca CA.pem [--cert CERT.pem --key KEY.pem]] [--api-key KEY]

OUT ending in .mp4, .mov, .mkv or .m4v gets a video with sound (H.264 + AAC, 25 fps);
OUT that is an existing folder or ends with '/' gets one JPEG per frame (000000.jpg, ...).
With `--codec h264` the service encodes the stream in H.264 and the access units are
written to OUT as they are (no JPEG decode and re-encode); `--push rtmp://...` or `--push
https://HOST/whip/...` (a WHIP endpoint, over WebRTC) also sends it live as the service
paces it (then OUT is optional; docs/DELIVERY.md).
Expected errors (service unreachable, unknown model, unreadable audio, ffmpeg failure)
print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lipsync.client import MIN_SAMPLES, SAMPLE_RATE, LipsyncClient, LipsyncError, load_audio
from lipsync.client.media import MediaError
from lipsync.client.render import (
    UsageError,
    check_h264_targets,
    check_model,
    output_kind,
    render_h264_to,
    render_to,
)

PROG = "lipsync-render"
EXIT_ERROR = 2
DEFAULT_SERVER = os.environ.get("COMPOSITING_ADDRESS", "localhost:50052")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Render a speech clip with a lip-sync avatar: an MP4 with sound, or a "
        "folder of JPEG frames.",
    )
    p.add_argument("--model", required=True, help="avatar name (see ListModels)")
    p.add_argument(
        "--audio",
        required=True,
        type=Path,
        help="speech file: wav, flac, ogg, mp3 (any rate, mono or stereo)",
    )
    p.add_argument(
        "--out",
        help="OUT.mp4 / .mov / .mkv for a video, or a folder (existing, or ending "
        "with '/') for JPEG frames (optional with --push)",
    )
    p.add_argument(
        "--codec",
        choices=["jpeg", "h264"],
        default="jpeg",
        help="jpeg: JPEG frames, encoded here into the video (default); h264: the service's "
        "H.264 stream, remuxed as it is",
    )
    p.add_argument(
        "--push",
        action="append",
        default=[],
        metavar="URL",
        help="also send the H.264 stream live to rtmp://HOST/APP/KEY or to a WHIP endpoint "
        "https://HOST/PATH (implies --codec h264; repeatable)",
    )
    p.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        help="compositing service address (default: $COMPOSITING_ADDRESS or %(default)s)",
    )
    p.add_argument(
        "--mode",
        choices=["stream", "batch"],
        default="stream",
        help="stream: one StreamComposite session (default); batch: InferBatchComposite requests",
    )
    p.add_argument(
        "--batch-size", type=int, default=24, help="frames per request in batch mode (default 24)"
    )
    p.add_argument(
        "--start-frame",
        type=int,
        default=0,
        help="background frame of the first video frame (default 0)",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for one request (default 120)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ca", help="connect with TLS, trusting this CA certificate (PEM)")
    p.add_argument("--cert", help="client certificate (PEM) for mutual TLS; needs --ca, --key")
    p.add_argument("--key", help="private key (PEM) of --cert")
    p.add_argument(
        "--api-key",
        default=None,
        help="API key for a service that requires one (default: $LIPSYNC_API_KEY; prefer "
        "the variable: a flag's value shows in the process list)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        print(f"{PROG}: error: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    h264 = args.codec == "h264" or bool(args.push)
    if args.push and args.mode == "batch":
        print(
            f"{PROG}: error: --push streams: it cannot be used with --mode batch", file=sys.stderr
        )
        return EXIT_ERROR
    if h264 and args.mode == "batch":
        print(f"{PROG}: error: --codec h264 needs --mode stream", file=sys.stderr)
        return EXIT_ERROR
    if args.out is None and not args.push:
        print(f"{PROG}: error: give --out (or --push)", file=sys.stderr)
        return EXIT_ERROR
    try:
        if h264:
            check_h264_targets(args.out, args.push)
        else:
            output_kind(args.out)
        audio, seconds = load_audio(args.audio)
        if audio.size < MIN_SAMPLES:
            print(
                f"{PROG}: note: the audio lasts {seconds:.3f} s, less than "
                f"{MIN_SAMPLES / SAMPLE_RATE:.4f} s: padded with silence",
                file=sys.stderr,
            )
        with LipsyncClient(
            args.server,
            timeout_s=args.timeout,
            ca_file=args.ca,
            cert_file=args.cert,
            key_file=args.key,
            api_key=args.api_key,
        ) as client:
            check_model(client, args.model)
            if h264:
                summary = render_h264_to(
                    client,
                    args.model,
                    audio,
                    args.out,
                    push=args.push,
                    start_frame=args.start_frame,
                    progress=not args.quiet,
                )
            else:
                summary = render_to(
                    client,
                    args.model,
                    audio,
                    args.out,
                    batch_size=args.batch_size,
                    mode=args.mode,
                    start_frame=args.start_frame,
                    progress=not args.quiet,
                )
    except (LipsyncError, MediaError, UsageError, OSError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
