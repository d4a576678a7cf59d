"""The generated gRPC/protobuf modules, importable from anywhere in the project.

The stubs are top-level modules (`compositing_pb2`, `compositing_pb2_grpc`, ...) in the
`shared_proto` folder, because that is what existing clients import with that folder on
PYTHONPATH, and what the generated `*_pb2_grpc.py` themselves import. The folder sits
beside the `lipsync` package both in the source tree (where `make setup` generates the
stubs) and in site-packages (where an installed wheel put them: setup.py generates them
at build time). This module puts that folder on `sys.path` once and re-exports the
modules; after `import lipsync.proto`, `import compositing_pb2` works too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _find_proto_dir() -> Path:
    """The `shared_proto` folder holding the stubs: beside `lipsync`, else wherever an
    importable `shared_proto` package is (an installation that split the two)."""
    beside = Path(__file__).resolve().parent.parent / "shared_proto"
    if (beside / "compositing_pb2.py").is_file():
        return beside
    spec = importlib.util.find_spec("shared_proto")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "compositing_pb2.py").is_file():
            return Path(location)
    return beside


PROTO_DIR = _find_proto_dir()

if str(PROTO_DIR) not in sys.path:
    sys.path.insert(0, str(PROTO_DIR))

try:
    import common_pb2  # messages both APIs use; compositing_pb2 re-exports them
    import compositing_pb2
    import compositing_pb2_grpc
    import inference_pb2
    import inference_pb2_grpc
except ImportError as exc:  # pragma: no cover - only before `make setup`
    raise ImportError(
        f"generated protocol stubs are missing in {PROTO_DIR}: run `make setup` "
        f"(or `python scripts/gen_proto.py`), or install the package ({exc})"
    ) from exc

__all__ = [
    "PROTO_DIR",
    "common_pb2",
    "compositing_pb2",
    "compositing_pb2_grpc",
    "inference_pb2",
    "inference_pb2_grpc",
]
