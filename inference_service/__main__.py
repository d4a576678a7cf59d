"""`python -m inference_service [--config FILE] [--port N]`: run the inference service."""

from __future__ import annotations

import os

# numpy's OpenBLAS threads spin after each call and take cores from ONNX Runtime (measured:
# ~5% end-to-end throughput on 2 cores); the services' matrix products are small. Set
# before numpy loads; the environment may override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    from inference_service.server import start
    from lipsync.serving.grpc_server import run_service

    return run_service("inference_service", __doc__, lambda c: c.inference, start, argv)


if __name__ == "__main__":
    raise SystemExit(main())
