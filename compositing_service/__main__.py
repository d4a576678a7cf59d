"""`python -m compositing_service [--config FILE] [--port N]`: run the compositing service."""

from __future__ import annotations

import os

# numpy's OpenBLAS threads spin after each call and take cores from the frame workers
# (measured: ~5% end-to-end throughput on 2 cores); the services' matrix products are
# small. Set before numpy loads; the environment may override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    from compositing_service.server import start
    from lipsync.serving.grpc_server import run_service

    return run_service("compositing_service", __doc__, lambda c: c.compositing, start, argv)


if __name__ == "__main__":
    raise SystemExit(main())
