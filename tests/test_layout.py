"""The layering of the code (docs/ARCHITECTURE.md): `lipsync/` is grouped by who uses it
and each group imports only the groups below it (ALLOWED); the services do not import
each other; the client runs without the services' heavy dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for p in paths:
        for name in sorted(imports_of(p)):
            if name.split(".")[0] in forbidden or name in forbidden:
                bad.append(f"{p.relative_to(REPO)} imports {name}")
    return bad


def test_imports_of_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from inference_service.engine import X\n    import cv2\n")
    assert {"inference_service.engine", "cv2"} <= imports_of(f)


def test_nothing_outside_the_inference_service_imports_it() -> None:
    paths = files("lipsync", "compositing_service", "training", "scripts")
    assert offenders(paths, ("inference_service",)) == []


def test_the_inference_service_imports_no_compositing_service() -> None:
    assert offenders(files("inference_service"), ("compositing_service",)) == []


# Which parts of the project each part may import (besides itself and the third-party
# packages of its extra). `lipsync` stands for the package's own top level: config.py,
# proto.py and __version__.
BASE = {"lipsync", "lipsync.config", "lipsync.proto"}
SERVICE_DEPS = BASE | {"lipsync.core", "lipsync.rpc", "lipsync.avatars", "lipsync.serving"}
ALLOWED: dict[str, set[str]] = {
    "lipsync.core": set(),  # the reference rules: numpy only (see below)
    "lipsync.rpc": BASE | {"lipsync.core"},  # both ends of a call, the client included
    "lipsync.client": BASE | {"lipsync.core", "lipsync.rpc"},
    "lipsync.avatars": BASE | {"lipsync.core"},
    "lipsync.serving": BASE | {"lipsync.core", "lipsync.rpc", "lipsync.avatars"},
    "inference_service": SERVICE_DEPS,
    "compositing_service": SERVICE_DEPS,
    "lipsync.agents": BASE | {"lipsync.core", "lipsync.rpc", "lipsync.client"},
    "lipsync.web": BASE | {"lipsync.core", "lipsync.rpc", "lipsync.serving", "lipsync.client"},
    "lipsync.local": BASE
    | {"lipsync.core", "lipsync.rpc", "lipsync.client", "lipsync.avatars", "lipsync.serving"},
    "lipsync.cli": BASE
    | {"lipsync.core", "lipsync.rpc", "lipsync.client", "lipsync.avatars", "lipsync.serving"}
    | {"lipsync.local"},
    "training": {"lipsync.core", "lipsync.avatars"},
}
SERVICES = ("inference_service", "compositing_service")


def part_of_module(name: str) -> str | None:
    """The part (a key of ALLOWED, or BASE) an imported module name belongs to."""
    top, _, rest = name.partition(".")
    if top in SERVICES:
        return top
    if top != "lipsync":
        return None
    sub = rest.partition(".")[0]
    return "lipsync" if sub in ("", "__version__") else f"lipsync.{sub}"


def part_of_file(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("").parts
    if rel[0] == "lipsync" and len(rel) > 2:
        return f"lipsync.{rel[1]}"
    if rel[0] == "lipsync":
        return "lipsync" if rel[1] == "__init__" else f"lipsync.{rel[1]}"
    return rel[0]


def test_every_part_of_lipsync_is_placed() -> None:
    """A new folder or top-level module of lipsync/ needs its place in ALLOWED (or BASE)."""
    here = {part_of_file(p) for p in files("lipsync")}
    assert here - set(ALLOWED) - BASE == set()


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_parts_below_it(part: str) -> None:
    folder = part.replace(".", "/")
    bad = []
    for p in files(folder):
        for name in sorted(imports_of(p)):
            target = part_of_module(name)
            if target is not None and target != part and target not in ALLOWED[part]:
                bad.append(f"{p.relative_to(REPO)} imports {name}")
    assert bad == []


def test_part_of_module_names_the_groups() -> None:
    assert part_of_module("lipsync.serving.store") == "lipsync.serving"
    assert part_of_module("lipsync.client") == "lipsync.client"
    assert part_of_module("lipsync") == "lipsync"
    assert part_of_module("lipsync.__version__") == "lipsync"
    assert part_of_module("compositing_service.routing") == "compositing_service"
    assert part_of_module("numpy") is None


def test_the_core_imports_no_service_and_no_rpc() -> None:
    bad = offenders(files("lipsync/core"), ("inference_service", "compositing_service", "grpc"))
    bad += [
        f"{p.relative_to(REPO)} imports {name}"
        for p in files("lipsync/core")
        for name in imports_of(p)
        if name.startswith("lipsync.") and not name.startswith("lipsync.core")
    ]
    assert bad == []


def test_the_agent_integrations_use_the_client_only() -> None:
    """lipsync.agents talks to the services through lipsync.client, like any client, and
    nothing else in the package imports the frameworks it adapts (docs/AGENTS.md)."""
    assert offenders(files("lipsync/agents"), ("inference_service", "compositing_service")) == []
    others = [p for p in files("lipsync") if "agents" not in p.relative_to(REPO).parts]
    assert offenders(others, ("pipecat", "livekit")) == []
    assert [
        str(p) for p in others if any(n.startswith("lipsync.agents") for n in imports_of(p))
    ] == []


HEAVY = ("onnxruntime", "librosa", "cv2", "scipy", "numba", "yaml", "aiohttp", "onnx", "av")

CLIENT_SCRIPT = """
import importlib.abc, sys
HEAVY = {heavy!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{{name}} is not part of the client install")
sys.meta_path.insert(0, Block())
import numpy as np
from lipsync.client import LipsyncClient, clip_frames, pad_audio, to_pcm16
import compositing_pb2, compositing_pb2_grpc
audio, padded = pad_audio(np.zeros(100, np.float32))
assert padded and clip_frames(len(audio)) == 4, clip_frames(len(audio))
assert to_pcm16(np.array([0.5], np.float32))[0] == 16384
LipsyncClient("localhost:1").close()
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
"""


def test_the_client_imports_without_the_services_dependencies() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT.format(heavy=HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"


@pytest.mark.parametrize(
    "name", ["lipsync.core.audio", "lipsync.core.windows", "lipsync.core.lookahead"]
)
def test_core_audio_rules_need_only_numpy(name: str) -> None:
    script = CLIENT_SCRIPT.split("import numpy")[0] + f"import {name}\nprint('ok')\n"
    out = subprocess.run(
        [sys.executable, "-c", script.format(heavy=HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
