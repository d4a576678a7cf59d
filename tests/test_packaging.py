"""The package as it is installed, not as it lies in this checkout.

- pyproject.toml: the base install is the client only; the extras the images use are
  pinned, consistently, in deploy/constraints.txt.
- A wheel built from the source tree alone (no .venv, no generated stubs: those are
  gitignored, so the build must make them) installs into a fresh venv with the base
  dependencies only, and from another folder its client talks to the real services.

The wheel test needs the package index the first time (the fresh venv gets its
dependencies from there); the wheels it fetches are kept in a wheelhouse under the temp
folder ($LIPSYNC_PACKAGING_CACHE), so later runs work offline. It skips only when the
index cannot be reached and the wheelhouse lacks something. On 2 cores it takes about
10 s with the wheelhouse filled, about 20 s the first time (30 MB of wheels to fetch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import cv2
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
# The extras the deploy images install; deploy/constraints.txt pins all they pull in
# (and the build requirements).
SERVICE_EXTRAS = ("compositing", "inference", "inference-gpu", "web")
# Nothing of the services' weight in a client install.
NOT_IN_BASE = {
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "librosa",
    "numba",
    "llvmlite",
    "scipy",
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "pyyaml",
    "aiohttp",
    "torch",
}
CACHE = Path(
    os.environ.get("LIPSYNC_PACKAGING_CACHE")
    or Path(tempfile.gettempdir()) / "lipsync-packaging-cache"
)
WHEELHOUSE = CACHE / "wheels"


def _requirements(extra: str | None = None) -> list[Requirement]:
    """Base dependencies (extra=None) or one extra's, self-references expanded."""
    project = PYPROJECT["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    out: list[Requirement] = []
    for line in raw:
        req = Requirement(line)
        if canonicalize_name(req.name) == PROJECT:
            for sub in sorted(req.extras):
                out += _requirements(sub)
        else:
            out.append(req)
    return out


def _names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def _lower_bound(req: Requirement) -> Version:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert bounds, f"{req} has no lower bound"
    return max(bounds)


def _constraint_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"line {n} is no exact pin: {line}"
        assert not req.marker and not req.extras, f"line {n}: {line}"
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


# -- pyproject and the constraints -------------------------------------------------------


def test_base_install_is_the_client_only():
    assert _names(_requirements()) == {"grpcio", "protobuf", "numpy", "soundfile", "soxr"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in (*SERVICE_EXTRAS, "render", "tools", "convert", "train", "dev"):
        assert name in extras, f"extra {name!r} is missing"
    inference = _names(_requirements("inference"))
    gpu = _names(_requirements("inference-gpu"))
    assert "onnxruntime" in inference and "onnxruntime-gpu" not in inference
    # ... and NVML for the GPU metrics (docs/OPERATIONS.md)
    assert gpu == (inference - {"onnxruntime"}) | {"onnxruntime-gpu", "onnx", "nvidia-ml-py"}
    assert "onnxruntime" not in _names(_requirements("compositing"))
    for extra in extras:  # every extra's requirement has a tested lower bound
        for req in _requirements(extra):
            _lower_bound(req)


def test_constraints_pin_every_service_dependency():
    pins = _constraint_pins()
    for extra in (None, *SERVICE_EXTRAS):
        for req in _requirements(extra):
            name = canonicalize_name(req.name)
            assert name in pins, f"{req} ({extra or 'base'}) is not pinned in {CONSTRAINTS}"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{CONSTRAINTS.name} pins {name}=={pins[name]}, outside {req} ({extra or 'base'})"
            )
    # The images' builder stage installs the build requirements under the same pins.
    for req in map(Requirement, PYPROJECT["build-system"]["requires"]):
        name = canonicalize_name(req.name)
        assert name in pins and req.specifier.contains(pins[name], prereleases=True), (
            f"build requirement {req} is not pinned (satisfied) in {CONSTRAINTS.name}"
        )
    assert PROJECT not in pins


def test_stub_generator_fits_the_runtime_lower_bounds():
    """The generated `*_pb2_grpc.py` refuse a grpcio older than the grpcio-tools that
    made them, so the build's grpcio-tools must not outrun the base grpcio bound."""
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    tools = next(r for r in build if canonicalize_name(r.name) == "grpcio-tools")
    grpcio = next(r for r in _requirements() if canonicalize_name(r.name) == "grpcio")
    (spec,) = tools.specifier
    assert spec.operator == "==", f"pin the stub generator exactly: {tools}"
    assert Version(spec.version) <= _lower_bound(grpcio)


# -- a wheel built from the source tree, in a fresh venv ---------------------------------


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def _run(cmd: list[str], *, check: bool = True, timeout: float = 300, **kw):
    res = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kw.pop("env", None) or _env(),
        **kw,
    )
    if check and res.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {res.returncode}\n"
            f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


def _pip(*args: object, check: bool = True, timeout: float = 300):
    return _run([sys.executable, "-m", "pip", *args], check=check, timeout=timeout)


# What pip prints when it cannot reach an index at all (as against a refusal it answered).
UNREACHABLE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Connection refused",
)


def _fetch_into_wheelhouse(requirements: list[str]) -> None:
    """Download `requirements` (and what they need) into the wheelhouse; skip the test
    when the package index cannot be reached."""
    res = _pip(
        "download", "-d", WHEELHOUSE, "--retries", "2", "--timeout", "60", *requirements,
        check=False, timeout=900,
    )  # fmt: skip
    if res.returncode == 0:
        return
    output = res.stdout + res.stderr
    if any(sign in output for sign in UNREACHABLE):
        pytest.skip(
            f"the package index cannot be reached and the wheelhouse {WHEELHOUSE} lacks "
            f"some of {requirements}: {output.strip().splitlines()[-1]}"
        )
    pytest.fail(f"pip download {requirements} failed:\n{output[-4000:]}")


def _offline_then_fetch(args: list[object], requirements: list[str], timeout: float = 300):
    """`pip *args` from the wheelhouse alone; on a miss, fill it and try once more."""
    offline = ["--no-index", "--find-links", WHEELHOUSE]
    if _pip(*args, *offline, check=False, timeout=timeout).returncode == 0:
        return
    _fetch_into_wheelhouse(requirements)
    _pip(*args, *offline, timeout=timeout)


def _copy_source_tree(dest: Path) -> None:
    """The files a clean clone plus this working tree's changes have: tracked and
    untracked-but-not-ignored files, so no .venv, no build output, no generated stubs."""
    git = shutil.which("git")
    ls = subprocess.run(
        [git or "false", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
    )
    if git and ls.returncode == 0:
        for rel in filter(None, ls.stdout.decode().split("\0")):
            src = REPO / rel
            if src.is_file():  # listed in the index but moved away in the working tree
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:  # not a git checkout: copy, leaving out what .gitignore names
        shutil.copytree(
            REPO,
            dest,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(
                ".git",
                ".venv",
                "__pycache__",
                "*.pyc",
                "*_pb2*.py*",
                "*.egg-info",
                "build",
                "out",
                ".pytest_cache",
                ".ruff_cache",
            ),
        )


def _pin_of(text: str, pattern: str) -> Version:
    m = re.search(pattern, text)
    assert m, f"no {pattern!r} in a generated stub"
    return Version(m.group(1))


def _check_wheel(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    protos = sorted(p.stem for p in (REPO / "shared_proto").glob("*.proto"))
    assert {"compositing", "inference"} <= set(protos)
    for stem in protos:
        for name in (f"{stem}.proto", f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"):
            assert f"shared_proto/{name}" in names, f"the wheel lacks shared_proto/{name}"
    for name in (
        "lipsync/client/__init__.py",
        "lipsync/client/grpc_client.py",
        "lipsync/proto.py",
        "shared_proto/__init__.py",
    ):
        assert name in names, f"the wheel lacks {name}"
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]
    # The stubs' own runtime requirements fit the base lower bounds.
    with zipfile.ZipFile(wheel) as z:
        pb2 = z.read("shared_proto/compositing_pb2.py").decode()
        grpc_stub = z.read("shared_proto/compositing_pb2_grpc.py").decode()
    base = {canonicalize_name(r.name): r for r in _requirements()}
    assert _pin_of(pb2, r"Protobuf Python Version: (\S+)") <= _lower_bound(base["protobuf"])
    assert _pin_of(grpc_stub, r"GRPC_GENERATED_VERSION = '([^']+)'") <= _lower_bound(base["grpcio"])


IMPORTS = """
import json, sys
import lipsync, lipsync.proto
from lipsync.client import LipsyncClient, load_audio
import compositing_pb2, compositing_pb2_grpc, inference_pb2, inference_pb2_grpc
assert lipsync.proto.compositing_pb2 is compositing_pb2
print(json.dumps({
    "lipsync": lipsync.__file__,
    "proto_dir": str(lipsync.proto.PROTO_DIR),
    "compositing_pb2": compositing_pb2.__file__,
    "common_pb2": getattr(lipsync.proto.common_pb2, "__file__", None),
}))
"""

# The README's way: `shared_proto` on PYTHONPATH, no lipsync import.
PLAIN_STUBS = """
import compositing_pb2, compositing_pb2_grpc
assert compositing_pb2_grpc.CompositingServiceStub
"""

CLIENT = """
import json, struct, sys
import numpy as np, soundfile as sf
from lipsync.client import LipsyncClient, load_audio

address, wav = sys.argv[1], sys.argv[2]
sr = 22050  # not 16 kHz: load_audio resamples (soxr)
t = np.arange(sr) / sr
sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))), sr)
audio, seconds = load_audio(wav)

def jpeg_size(b):  # (width, height) from the SOF marker
    assert b[:3] == b"\\xff\\xd8\\xff" and b[-2:] == b"\\xff\\xd9", "not a JPEG"
    i = 2
    while True:
        marker, length = b[i + 1], struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return [w, h]
        i += 2 + length

with LipsyncClient(address) as client:
    models = sorted(m.model_id for m in client.list_models())
    batch = client.composite_batch("alice", 6, audio=audio)
print(json.dumps({
    "samples": int(audio.size), "seconds": seconds, "models": models,
    "sizes": [jpeg_size(f) for f in batch.frames],
}))
"""


@pytest.mark.slow
def test_wheel_from_source_tree_gives_a_working_client(tmp_path, avatars_root, shared_encoder):
    from tests.conftest import service_config, start_services, stop_services

    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    src, dist, venv, elsewhere = (tmp_path / d for d in ("src", "dist", "venv", "elsewhere"))
    for d in (src, dist, elsewhere):
        d.mkdir()

    # 1. The wheel, built (in pip's isolated build env) from the source files alone.
    _copy_source_tree(src)
    assert not list((src / "shared_proto").glob("*_pb2*")), "stubs in the copied tree"
    build_requires = PYPROJECT["build-system"]["requires"]
    _offline_then_fetch(["wheel", "-q", "--no-deps", "-w", dist, src], build_requires)
    (wheel,) = dist.glob("*.whl")
    _check_wheel(wheel)

    # 2. A fresh venv with the wheel and its base dependencies, nothing else.
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    base = [str(r) for r in _requirements()]
    _offline_then_fetch(["--python", py, "install", "-q", wheel], base)
    listed = json.loads(_pip("--python", py, "list", "--format=json").stdout)
    installed = {canonicalize_name(p["name"]) for p in listed}
    assert PROJECT in installed
    assert not installed & NOT_IN_BASE, f"the base install pulled {installed & NOT_IN_BASE}"

    # 3. From another folder: the client and its stubs, from site-packages.
    res = _run([py, "-c", IMPORTS], cwd=elsewhere)
    where = json.loads(res.stdout)
    site = Path(where["lipsync"]).parent.parent
    assert site.resolve().is_relative_to(venv.resolve()), where
    assert Path(where["proto_dir"]) == (site / "shared_proto").resolve(), where
    assert Path(where["compositing_pb2"]).parent == site / "shared_proto", where
    if (REPO / "shared_proto" / "common.proto").is_file():
        assert where["common_pb2"] and Path(where["common_pb2"]).parent == site / "shared_proto"
    env = _env()
    env["PYTHONPATH"] = str(site / "shared_proto")
    _run([py, "-c", PLAIN_STUBS], cwd=elsewhere, env=env)

    # 4. ... talking to the real services (run from this checkout).
    services = start_services(service_config(avatars_root, shared_encoder))
    try:
        res = _run(
            [py, "-c", CLIENT, services.address, elsewhere / "speech.wav"],
            cwd=elsewhere,
            timeout=120,
        )
    finally:
        stop_services(services)
    out = json.loads(res.stdout)
    assert out["samples"] == 16000 and out["seconds"] == pytest.approx(1.0)
    assert "alice" in out["models"]
    frame = cv2.imread(str(min((avatars_root / "alice" / "frames").iterdir())))
    height, width = frame.shape[:2]
    assert out["sizes"] == [[width, height]] * 6  # alice's frames, as JPEG
