"""Generate the Python protobuf/gRPC stubs of every shared_proto/*.proto.

Two callers, one function (`generate`):

- `make setup` runs this file, which writes the stubs into shared_proto/ itself (the
  source tree: `lipsync.proto` and `PYTHONPATH=shared_proto` clients import them there);
- `setup.py` loads this file while a wheel is built and writes them into the wheel's
  `shared_proto/` package, so an installed wheel has stubs that no checkout had to hold
  (they are gitignored).

The stubs are top-level modules (`compositing_pb2`, `compositing_pb2_grpc`, ...), because
that is what existing clients import and what the generated `*_pb2_grpc.py` import.
Needs `grpcio-tools` (the `dev` extra; a build dependency in pyproject.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent.parent / "shared_proto"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtocError(RuntimeError):
    """protoc refused the .proto files (its messages went to stderr)."""


def is_stub(name: str) -> bool:
    """Whether a file name is one of the generated stub files."""
    return name.endswith(STUB_SUFFIXES)


def stub_names(protos: list[Path]) -> list[str]:
    """The file names `generate` writes for these .proto files."""
    return [p.stem + suffix for p in protos for suffix in STUB_SUFFIXES]


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path | None = None) -> list[Path]:
    """Compile every *.proto in `proto_dir` into `out_dir` (default: `proto_dir`).

    Returns the files written. Stub files in `out_dir` whose .proto is gone are removed,
    so a renamed or deleted .proto leaves no stale module behind.
    """
    from grpc_tools import protoc  # imported here so `is_stub` etc. need no grpcio-tools

    proto_dir = Path(proto_dir).resolve()
    out_dir = proto_dir if out_dir is None else Path(out_dir).resolve()
    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise ProtocError(f"no .proto files in {proto_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(stub_names(protos))
    for old in out_dir.iterdir():
        if is_stub(old.name) and old.name not in wanted:
            old.unlink()
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *(p.name for p in protos),
        ]
    )
    if rc != 0:
        raise ProtocError(f"protoc failed ({rc}) on {', '.join(p.name for p in protos)}")
    return [out_dir / name for name in sorted(wanted)]


def main() -> int:
    try:
        written = generate()
    except ProtocError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(f"{exc}: install grpcio-tools (the `dev` extra)", file=sys.stderr)
        return 1
    print(f"generated {len(written)} stub files in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
