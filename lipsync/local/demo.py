"""`python -m lipsync.local.demo` (what `make demo` runs): render the bundled speech clip with the
bundled avatar to an MP4, end to end through both services.

It starts the inference and compositing services as child processes (ports from the
config / environment; free ones when those are busy), waits until both are healthy,
renders `assets/speech/demo.wav` with the avatar `demo` to `out/demo.mp4`, then stops the
services (also on Ctrl-C or an error).

    python -m lipsync.local.demo [--model demo] [--audio assets/speech/demo.wav]
                           [--out out/demo.mp4] [--config FILE] [--verbose]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from lipsync.avatars.package import MANIFEST_NAME, AvatarCatalog
from lipsync.client import LipsyncClient, LipsyncError, load_audio
from lipsync.client.media import MediaError
from lipsync.client.render import UsageError, check_model, output_kind, render_to
from lipsync.config import ConfigError, load_config
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import pick_ports

PROG = "lipsync.local.demo"
EXIT_ERROR = 2
REPO = Path(__file__).resolve().parents[2]
DEFAULT_AUDIO = REPO / "assets" / "speech" / "demo.wav"
DEFAULT_OUT = Path("out") / "demo.mp4"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="demo", help="avatar name (default: demo)")
    p.add_argument(
        "--audio",
        type=Path,
        default=DEFAULT_AUDIO,
        help="speech file (default: assets/speech/demo.wav)",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output video (default: out/demo.mp4)")
    p.add_argument("--config", help="YAML config file (default: $LIPSYNC_CONFIG)")
    p.add_argument("--batch-size", type=int, default=24, help="frames per request (default 24)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the services' logs")
    return p


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    cfg = load_config(args.config)
    output_kind(args.out)
    # Check the inputs before starting anything.
    catalog = AvatarCatalog(cfg.avatars_path)
    if args.model not in catalog.names():
        why = catalog.errors.get(args.model)
        folder = cfg.avatars_path / args.model
        if why is None and folder.is_dir() and not (folder / MANIFEST_NAME).is_file():
            why = f"{folder} has no {MANIFEST_NAME} yet"
        have = ", ".join(catalog.names()) or "none"
        raise LipsyncError(
            f"avatar {args.model!r} not found in {cfg.avatars_path.resolve()}"
            + (f" ({why})" if why else f" (found: {have})")
            + "; set AVATARS_DIR or avatars_dir to the folder holding it"
        )
    audio, seconds = load_audio(args.audio)
    inf_port, comp_port = pick_ports(cfg.inference.port, cfg.compositing.port)
    if (inf_port, comp_port) != (cfg.inference.port, cfg.compositing.port):
        print(
            f"{PROG}: default ports busy; using {inf_port} (inference) and {comp_port} "
            "(compositing)",
            file=sys.stderr,
        )
    env = dict(os.environ)
    if not args.verbose:
        env.setdefault("LIPSYNC_LOG_LEVEL", "WARNING")
    print(f"{PROG}: starting the services ...", file=sys.stderr)
    services = ServiceProcesses(
        args.config, env=env, inference_port=inf_port, compositing_port=comp_port
    )
    with services:
        t_ready = time.perf_counter()
        print(
            f"{PROG}: services ready in {t_ready - t_start:.1f} s at {services.address}; "
            f"rendering {seconds:.2f} s of audio with {args.model!r}",
            file=sys.stderr,
        )
        with LipsyncClient(services.address, timeout_s=300.0) as client:
            check_model(client, args.model)
            summary = render_to(
                client, args.model, audio, args.out, batch_size=args.batch_size, progress=True
            )
    total = time.perf_counter() - t_start
    print(
        f"{summary.out}: {summary.frames} frames, {summary.video_seconds:.2f} s of video "
        f"({seconds:.2f} s of audio); rendered in {summary.render_seconds:.1f} s "
        f"({summary.fps:.1f} frames/s), {total:.1f} s in all with service start-up"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM alone
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run(args)
    except (
        LipsyncError,
        MediaError,
        UsageError,
        ConfigError,
        OSError,
        RuntimeError,
        TimeoutError,
    ) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; services stopped", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
