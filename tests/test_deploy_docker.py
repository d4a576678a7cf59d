"""The deployment, run for real under Docker (docs/DEPLOY.md):

- `make images` builds the CPU inference, compositing and web images on a stand-in of
  their base image (tests/docker/standin_base.sh: this machine cannot pull
  python:3.11-slim-bookworm);
- the CPU compose stack (docker-compose.yml + deploy/compose.cpu.yml, with Compose v1
  where installed, as Debian ships it) comes up healthy with a test avatar folder, renders
  speech through the published client port with frames that match the reference
  semantics (tests/oracle.py), and serves the page on the published web port;
- every pod of each Kubernetes overlay, started under Docker as the kubelet would start it
  (tests/docker/pods.py: command, env with the service-link variables, ConfigMap, user,
  read-only root, emptyDirs), passes its startup, readiness and liveness probes, and the
  compositing pod renders frames through the inference pod.

Skipped, with the reason, where Docker, Compose or debootstrap is missing; with
LIPSYNC_REQUIRE_DOCKER=1 (.ci/run) those are failures instead. Containers are reached only
on 127.0.0.1 or on Docker's bridge networks; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from tests.avatar_factory import make_avatar, speech_like
from tests.docker import engine
from tests.docker.engine import REQUIRE_ENV, docker, run
from tests.docker.manifests import kubectl_problem, render
from tests.docker.pods import scratch_dir, start_pod, wait_ready
from tests.oracle import Oracle, decode_jpeg, jpeg_roundtrip, psnr

pytestmark = pytest.mark.slow

TAG = "citest"  # fixed: a second run reuses the images and their layers
JPEG_QUALITY = 90  # the default, and k8s/base/config.yaml's
BUILD_TIMEOUT_S = 1800
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_timings(request: pytest.FixtureRequest) -> Iterator[None]:
    """The time each stage took, on the terminal after the module's tests."""
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None or not TIMINGS:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for stage, seconds in TIMINGS.items():
            reporter.write_line(f"deployment test timing: {stage}: {seconds:.1f} s")


def unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the deployment tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def base_image() -> str:
    problem = engine.engine_problem()
    if problem:
        unavailable(problem)
    tag = os.environ.get("LIPSYNC_STANDIN_BASE", "")
    have = bool(tag) and bool(docker("image", "ls", "-q", tag, timeout_s=20))
    if not have and (shutil.which("debootstrap") is None or os.geteuid() != 0):
        unavailable("no stand-in base image and no way to make one (debootstrap, as root)")
    t0 = time.monotonic()
    tag = engine.standin_base()
    TIMINGS["stand-in base"] = time.monotonic() - t0
    return tag


@pytest.fixture(scope="module")
def images(base_image: str) -> dict[str, str]:
    """`make images` for the CPU images; the local tag of each image name."""
    t0 = time.monotonic()
    run(
        [
            "make",
            "--no-print-directory",
            "images",
            "IMAGES=inference-cpu compositing web",
            f"BASE_IMAGE={base_image}",
            f"IMAGE_TAG={TAG}",
        ],
        BUILD_TIMEOUT_S,
    )
    TIMINGS["make images"] = time.monotonic() - t0
    return {
        "lipsync-inference": f"lipsync-inference:{TAG}-cpu",
        "lipsync-compositing": f"lipsync-compositing:{TAG}",
        "lipsync-web": f"lipsync-web:{TAG}",
    }


@pytest.fixture(scope="module")
def avatars() -> Iterator[Path]:
    """One small avatar, readable by the containers' user (uid 10001)."""
    root = Path(tempfile.mkdtemp(prefix="lipsync-avatars-"))
    make_avatar(root, "alice", n_frames=7, width=256, height=224, seed=0)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return speech_like(1.6, seed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worst_psnr(jpegs, expected) -> float:
    return min(
        psnr(decode_jpeg(j), jpeg_roundtrip(e, JPEG_QUALITY))
        for j, e in zip(jpegs, expected, strict=True)
    )


def check_rendering(address: str, avatars: Path, clip: np.ndarray, batch: int = 8) -> None:
    """InferBatchComposite through `address`: the reference's frames, sharply."""
    with grpc.insecure_channel(address) as channel:
        stub = cpb_grpc.CompositingServiceStub(channel)
        resp = stub.InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id="alice", raw_audio=clip.tobytes(), batch_size=batch, start_frame_idx=4
            ),
            timeout=120,
        )
    assert resp.success, resp.error
    assert len(resp.composited_frames) == batch
    oracle = Oracle(avatars / "alice")
    expected = oracle.clip_frames(clip, batch=batch, start=4)
    worst = worst_psnr(resp.composited_frames, expected)
    assert worst >= 50.0, f"worst-frame PSNR {worst:.1f} dB against the reference"
    # The comparison is sharp: the audio of the next frame does not pass.
    slipped = [oracle.frame(4 + k, oracle.audio_block(clip, k + 1)) for k in range(batch)]
    assert worst_psnr(resp.composited_frames, slipped) < 40.0


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.status, resp.read()


def check_page(base_url: str) -> None:
    status, body = http_get(f"{base_url}/")
    assert status == 200 and b"<html" in body.lower()
    status, body = http_get(f"{base_url}/api/models")
    assert status == 200
    assert [m["model_id"] for m in json.loads(body)] == ["alice"]


def test_images(images: dict[str, str]):
    """Non-root users, HEALTHCHECKs, and what each image carries or does not."""
    for image in images.values():
        cfg = json.loads(docker("image", "inspect", image, timeout_s=20))[0]["Config"]
        assert cfg["User"] == "10001:10001", image
        assert cfg["Healthcheck"]["Test"][:2] == ["CMD", "python"], image
    probe = "import importlib.util as u; print([bool(u.find_spec(m)) for m in {!r}])"
    modules = ["onnxruntime", "librosa", "cv2", "aiohttp"]
    found = {
        name: json.loads(
            docker("run", "--rm", "--entrypoint", "python", image, "-c", probe.format(modules),
                   timeout_s=60).lower()
        )
        for name, image in images.items()
    }
    assert dict(zip(modules, found["lipsync-compositing"], strict=True)) == {
        "onnxruntime": False, "librosa": False, "cv2": True, "aiohttp": False
    }
    assert dict(zip(modules, found["lipsync-inference"], strict=True))["onnxruntime"]
    assert dict(zip(modules, found["lipsync-web"], strict=True)) == {
        "onnxruntime": False, "librosa": False, "cv2": False, "aiohttp": True
    }


def test_compose_cpu_stack(images, base_image, avatars, clip):
    compose = engine.compose_command()
    if compose is None:
        unavailable("neither docker-compose nor `docker compose` is installed")
    project = f"lipsync-ci-{os.getpid()}"
    grpc_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "LIPSYNC_TAG": TAG,
        "LIPSYNC_BASE_IMAGE": base_image,
        "AVATARS_PATH": str(avatars),
        "PUBLISH_IP": "127.0.0.1",
        "COMPOSITING_PUBLISH_PORT": str(grpc_port),
        "WEB_PUBLISH_PORT": str(web_port),
    }
    cmd = [*compose, "-p", project, "-f", "docker-compose.yml", "-f", "deploy/compose.cpu.yml"]
    t0 = time.monotonic()
    try:
        # Compose's own build of the same images: every layer comes from `make images`.
        run([*cmd, "build"], BUILD_TIMEOUT_S, env=env)
        TIMINGS["compose build (cached)"] = time.monotonic() - t0
        t1 = time.monotonic()
        run([*cmd, "up", "-d", "--no-build"], 600, env=env)
        ids = run([*cmd, "ps", "-q"], 60, env=env).stdout.split()
        assert len(ids) == 3, ids
        engine.wait_healthy(ids, 300)
        TIMINGS["compose up until healthy"] = time.monotonic() - t1
        for cid in ids:
            info = engine.inspect(cid)
            assert info["Config"]["User"] == "10001:10001"
            assert info["HostConfig"]["ReadonlyRootfs"] is True
            assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        check_rendering(f"127.0.0.1:{grpc_port}", avatars, clip)
        check_page(f"http://127.0.0.1:{web_port}")
    finally:
        run([*cmd, "down", "-v", "--remove-orphans", "-t", "10"], 180, env=env, check=False)
    TIMINGS["compose stack in all"] = time.monotonic() - t0


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_pods_become_ready(images, avatars, clip, overlay):
    problem = kubectl_problem()
    if problem:
        unavailable(problem)
    docs = render(overlay)
    # The GPU overlay's inference image is the CUDA build, which CI does not build (its
    # CUDA wheels are ~2.1 GB): its pod runs with the CPU build of the same Dockerfile
    # (the container spec, command, env, mounts, user, probes, is what is under test), or
    # with the image LIPSYNC_TEST_GPU_IMAGE names (`make images IMAGES=inference`), which
    # then shows its fallback to the CPU.
    image_map = dict(images)
    gpu_image = os.environ.get("LIPSYNC_TEST_GPU_IMAGE")
    if overlay == "gpu" and gpu_image:
        image_map["lipsync-inference"] = gpu_image
    network = f"lipsync-k8s-{overlay}-{os.getpid()}"
    workdir = scratch_dir()
    pods = []
    t0 = time.monotonic()
    docker("network", "create", network, timeout_s=30)
    try:
        for dep in (d for d in docs if d["kind"] == "Deployment"):
            pods.append(
                start_pod(dep, docs, image_map, network, avatars, workdir, f"k8s{os.getpid()}")
            )
        for pod in pods:
            wait_ready(pod)
        TIMINGS[f"k8s {overlay}: pods ready"] = time.monotonic() - t0
        env = engine.inspect(pods[0].containers[0])["Config"]["Env"]
        assert any(e.startswith("LIPSYNC_INFERENCE_SERVICE_HOST=") for e in env)
        assert any(e.startswith("LIPSYNC_COMPOSITING_PORT=") for e in env)
        (comp,) = [p for p in pods if p.name.endswith("lipsync-compositing")]
        check_rendering(f"{comp.ip}:50052", avatars, clip, batch=4)
        check_page(f"http://{comp.ip}:8080")
    finally:
        for pod in pods:
            pod.remove()
        docker("network", "rm", network, timeout_s=30, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
