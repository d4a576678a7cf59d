"""Build hook: the gRPC stubs are generated while the package is built.

Everything else about the package is in pyproject.toml. The generated stubs
(`shared_proto/*_pb2*.py`) are gitignored, so a wheel built from a clean checkout would
have none; this `build_py` compiles every `shared_proto/*.proto` with grpcio-tools (a
build requirement) into the wheel's `shared_proto/` package. An editable install
(`pip install -e .`, as `make setup` does) writes them into the source tree's
`shared_proto/` instead. The generator is scripts/gen_proto.py, the one `make setup`
runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE = "shared_proto"


def _gen_proto():
    path = ROOT / "scripts" / "gen_proto.py"
    spec = importlib.util.spec_from_file_location("_lipsync_gen_proto", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    """`build_py` that also generates the protobuf/gRPC stubs of shared_proto/*.proto."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == PROTO_PACKAGE:  # stubs lying in a developer's tree: regenerated below
            gen = _gen_proto()
            modules = [m for m in modules if not gen.is_stub(Path(m[2]).name)]
        return modules

    def run(self):
        super().run()
        gen = _gen_proto()
        if self.editable_mode:
            out_dir = ROOT / PROTO_PACKAGE
        else:
            out_dir = Path(self.build_lib, PROTO_PACKAGE)
        written = gen.generate(ROOT / PROTO_PACKAGE, out_dir)
        self.announce(f"generated {len(written)} gRPC stub files in {out_dir}", level=2)
        if not self.editable_mode:
            self.byte_compile([str(p) for p in written if p.suffix == ".py"])


setup(cmdclass={"build_py": BuildPyWithStubs})
