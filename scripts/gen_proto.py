"""Generate the Python protobuf/gRPC stubs into shared_proto/ (run by `make setup`)."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent.parent / "shared_proto"


def main() -> int:
    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={PROTO_DIR}",
        f"--pyi_out={PROTO_DIR}",
        f"--grpc_python_out={PROTO_DIR}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed ({rc})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
