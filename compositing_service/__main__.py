"""`python -m compositing_service [--config FILE] [--port N]`: run the compositing service."""

from __future__ import annotations

import os

# numpy's OpenBLAS threads spin after each call and take cores from ONNX Runtime and the
# frame workers (measured: ~5% end-to-end throughput on 2 cores); the services' matrix
# products are small. Set before numpy loads; the environment may override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse

from lipsync.config import load_config
from lipsync.grpc_util import setup_logging, wait_for_termination


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="compositing_service", description=__doc__)
    ap.add_argument("--config", help="YAML config file (default: $LIPSYNC_CONFIG)")
    ap.add_argument("--port", type=int, help="override compositing.port")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.port is not None:
        cfg.compositing.port = args.port
    setup_logging(cfg.log_level)
    from compositing_service.server import start

    running = start(cfg)
    wait_for_termination(running.server, on_stop=running.close)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
