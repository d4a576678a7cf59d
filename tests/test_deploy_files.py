"""The deployment files parse and agree with the code and with each other: compose files,
Dockerfiles, `make images`, the Kubernetes base and overlays (rendered with `kubectl
kustomize`, validated with `kubernetes-validate --strict`), the config example.
tests/test_deploy_docker.py runs them for real."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from lipsync.config import from_dict, load_config, to_dict
from tests.docker.engine import REQUIRE_ENV
from tests.docker.manifests import OVERLAYS, kubectl_problem, render, render_text

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {
    "inference": REPO / "deploy" / "inference.Dockerfile",
    "compositing": REPO / "deploy" / "compositing.Dockerfile",
    "web": REPO / "deploy" / "web.Dockerfile",
}
DEFAULT_BASE = "python:3.11-slim-bookworm"
PORTS = {"inference": 50051, "compositing": 50052, "web": 8080}


def compose(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def keys_anywhere(node, key: str) -> bool:
    if isinstance(node, dict):
        return key in node or any(keys_anywhere(v, key) for v in node.values())
    if isinstance(node, list):
        return any(keys_anywhere(v, key) for v in node)
    return False


# --- the example config -------------------------------------------------------------


def test_config_example_is_every_default():
    example = REPO / "deploy" / "config.example.yaml"
    assert to_dict(load_config(example, env={})) == to_dict(load_config(env={}))


def test_image_default_config_is_valid():
    cfg = from_dict(yaml.safe_load((REPO / "deploy" / "image-config.yaml").read_text()))
    assert cfg.avatars_dir == "/avatars"
    assert cfg.compositing.inference_address == "inference:50051"
    assert cfg.web.compositing_address == "compositing:50052"
    assert cfg.inference.host == cfg.compositing.host == cfg.web.host == "0.0.0.0"


# --- compose --------------------------------------------------------------------------


def test_compose_services_ports_healthchecks():
    services = compose("docker-compose.yml")["services"]
    assert set(services) == {"inference", "compositing", "web"}
    assert services["compositing"]["ports"] == [
        "${PUBLISH_IP:-0.0.0.0}:${COMPOSITING_PUBLISH_PORT:-50052}:50052"
    ]
    assert services["web"]["ports"] == ["${PUBLISH_IP:-0.0.0.0}:${WEB_PUBLISH_PORT:-8080}:8080"]
    assert "ports" not in services["inference"]  # internal only
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped"
        assert svc["healthcheck"]["test"][-1] == name
        assert (REPO / svc["build"]["dockerfile"]).resolve() == DOCKERFILES[name]
        assert svc["build"]["args"]["BASE_IMAGE"] == f"${{LIPSYNC_BASE_IMAGE:-{DEFAULT_BASE}}}"
    for name in ("inference", "compositing"):
        assert services[name]["volumes"] == ["${AVATARS_PATH:-./avatars}:/avatars:ro"]
    assert services["compositing"]["depends_on"] == {"inference": {"condition": "service_healthy"}}
    assert services["web"]["depends_on"] == {"compositing": {"condition": "service_healthy"}}


def test_webrtc_turn_settings_reach_the_gateway():
    """WebRTC media are UDP on random ports (aiortc pins none): compose passes the TURN
    settings on from the host, the k8s config names them, and both notes say so."""
    web = compose("docker-compose.yml")["services"]["web"]
    env = web["environment"]
    for name in ("SERVERS", "USERNAME", "CREDENTIAL"):
        key = f"LIPSYNC_WEB__ICE_{name}"
        assert key in env and env[key] is None  # from the host's environment, when set
    assert "TURN" in (REPO / "docker-compose.yml").read_text()
    cfg = from_dict(yaml.safe_load((REPO / "k8s" / "base" / "config.yaml").read_text()))
    assert cfg.web.ice_servers == [] and cfg.web.webrtc_max_sessions > 0
    assert "TURN" in (REPO / "k8s" / "base" / "web.yaml").read_text()


def test_gpu_request_only_in_the_override_file():
    """`docker compose up` reads docker-compose.override.yml (the GPU); naming the files
    with -f leaves it out. Compose v2 merges lists by appending, so the CPU file could not
    take a device request away: none may be anywhere but in the override."""
    for name in ("docker-compose.yml", "deploy/compose.cpu.yml"):
        doc = compose(name)
        for key in ("devices", "runtime", "gpus", "device_requests"):
            assert not keys_anywhere(doc, key), f"{name} has {key}"
    override = compose("docker-compose.override.yml")["services"]
    assert set(override) == {"inference"}
    (device,) = override["inference"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    cpu = compose("deploy/compose.cpu.yml")["services"]
    assert set(cpu) == {"inference"}
    assert cpu["inference"]["build"]["args"] == {"EXTRA": "inference", "EXTRA_PACKAGES": ""}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_v1_merges_both_variants():
    def merged(*files: str) -> dict:
        args = ["docker-compose"] + [a for f in files for a in ("-f", f)] + ["config"]
        out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return yaml.safe_load(out.stdout)["services"]

    gpu = merged("docker-compose.yml", "docker-compose.override.yml")
    assert keys_anywhere(gpu["inference"], "devices")
    cpu = merged("docker-compose.yml", "deploy/compose.cpu.yml")
    assert not keys_anywhere(cpu, "devices")
    assert cpu["inference"]["build"]["args"]["EXTRA"] == "inference"
    assert cpu["inference"]["image"].endswith("-cpu")


# --- Dockerfiles and make images -----------------------------------------------------------


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfiles(name):
    text = DOCKERFILES[name].read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == f"ARG BASE_IMAGE={DEFAULT_BASE}"  # the base is a build argument
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    stages = {ln.split(" AS ")[1] for ln in froms if " AS " in ln}
    assert len(froms) >= 2 and froms[-1] == "FROM ${BASE_IMAGE}"  # multi-stage, fresh base
    assert all(ln.split()[1] in {"${BASE_IMAGE}", *stages} for ln in froms)
    final = text[text.rindex("\nFROM ") :]
    assert "USER 10001:10001" in final
    assert "HEALTHCHECK" in final and f'"{name}"]' in final
    assert f"EXPOSE {PORTS[name]}" in final
    assert "-c deploy/constraints.txt" in (REPO / "deploy" / "build_venv.sh").read_text()
    # No field of the configuration in the image's environment: it would override the
    # file a deployment mounts (LIPSYNC_CONFIG).
    env = " ".join(re.findall(r"^ENV (.*(?:\\\n.*)*)", final, re.M))
    for var in ("AVATARS_DIR", "INFERENCE_ADDRESS", "COMPOSITING_ADDRESS", "LIPSYNC_WEB__"):
        assert var not in env
    # The test-only pieces never reach what users build.
    assert "standin" not in text and "ca-certificates.crt" not in text


def _image_requirements():
    path = REPO / "deploy" / "image_requirements.py"
    spec = importlib.util.spec_from_file_location("_image_requirements", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(*files: str) -> dict[str, str]:
    pins = {}
    for name in files:
        for line in (REPO / "deploy" / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                dist, version = line.split("==")
                pins[re.sub(r"[-_.]+", "-", dist).lower()] = version
    return pins


@pytest.mark.parametrize("extra", ["inference", "inference-gpu", "compositing", "web"])
def test_every_direct_dependency_of_an_image_is_pinned(extra):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins("constraints.txt", "cuda-constraints.txt")
    reqs = _image_requirements().extra_requirements(project, extra)
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group()).lower() for r in reqs}
    unpinned = names - set(pins)
    assert names and not unpinned, f"not pinned in deploy/constraints.txt: {unpinned}"
    if extra == "inference-gpu":  # the CUDA wheels onnxruntime-gpu[cuda,cudnn] brings
        assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"} <= set(pins)


def test_image_requirements_expand_self_references():
    project = {
        "name": "lipsync-serving",
        "dependencies": ["grpcio>=1"],
        "optional-dependencies": {"a": ["x"], "b": ["lipsync_serving[a]", "y; python_version>'3'"]},
    }
    assert _image_requirements().extra_requirements(project, "b") == [
        "grpcio>=1", "x", "y; python_version>'3'"
    ]


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "tests", "avatars", "training"):
        assert path in ignored


def test_make_images_builds_all_four():
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "images"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    builds = re.findall(r"docker build -f (\S+) (.*?)-t (\S+) \.", out.stdout)
    assert [(f, t) for f, _, t in builds] == [
        ("deploy/inference.Dockerfile", "lipsync-inference:0.1.0"),
        ("deploy/inference.Dockerfile", "lipsync-inference:0.1.0-cpu"),
        ("deploy/compositing.Dockerfile", "lipsync-compositing:0.1.0"),
        ("deploy/web.Dockerfile", "lipsync-web:0.1.0"),
    ]
    assert all(f"--build-arg BASE_IMAGE={DEFAULT_BASE}" in args for _, args, _ in builds)
    assert "EXTRA=inference " in builds[1][1] and "EXTRA=" not in builds[0][1]


# --- Kubernetes -----------------------------------------------------------------------------


def test_single_file_manifest_is_gone():
    assert not (REPO / "k8s" / "lipsync.yaml").exists()
    assert (REPO / "k8s" / "base" / "kustomization.yaml").is_file()
    for overlay in OVERLAYS:
        assert (REPO / "k8s" / "overlays" / overlay / "kustomization.yaml").is_file()


def test_k8s_config_is_a_valid_config():
    cfg = from_dict(yaml.safe_load((REPO / "k8s" / "base" / "config.yaml").read_text()))
    assert cfg.avatars_dir == "/avatars"
    assert cfg.compositing.inference_address == "lipsync-inference:50051"
    assert cfg.web.compositing_address == "localhost:50052"
    assert cfg.inference.host == cfg.compositing.host == cfg.web.host == "0.0.0.0"


def needs_kubectl():
    problem = kubectl_problem()
    if problem:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(problem)
        pytest.skip(problem)


def pod_specs(docs):
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] == "Deployment"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_the_promised_properties(overlay):
    needs_kubectl()
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "PersistentVolumeClaim", "Ingress", "NetworkPolicy"]
        + ["Deployment", "Service", "PodDisruptionBudget"] * 2
        + ["Service"]
    )
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    from_dict(yaml.safe_load(cm["data"]["config.yaml"]))
    pdbs = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
            for d in docs if d["kind"] == "PodDisruptionBudget"}
    specs = pod_specs(docs)
    assert pdbs == set(specs)
    for name, spec in specs.items():
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
        assert volumes["avatars"]["persistentVolumeClaim"]["readOnly"] is True
        drain = 0
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["config"]["mountPath"] == "/etc/lipsync"
            assert {"name": "LIPSYNC_CONFIG", "value": "/etc/lipsync/config.yaml"} in c["env"]
            if "avatars" in mounts:
                assert mounts["avatars"]["readOnly"] is True
            assert volumes[mounts["tmp"]["name"]].get("emptyDir") is not None
            port = c["ports"][0]["containerPort"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c[probe]
                if port in (50051, 50052):
                    assert p["grpc"]["port"] == port, (name, c["name"], probe)
                else:
                    assert p["httpGet"]["path"] == "/healthz"
            (cmd, seconds) = c["lifecycle"]["preStop"]["exec"]["command"]
            assert cmd == "sleep"
            drain = max(drain, int(seconds) + 5)  # + the services' 5 s grace after SIGTERM
        assert spec["terminationGracePeriodSeconds"] > drain, name
    inference = specs["lipsync-inference"]["containers"][0]
    if overlay == "gpu":
        assert inference["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert inference["image"] == "lipsync-inference:0.1.0"
        tolerations = specs["lipsync-inference"]["tolerations"]
        gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        assert gpu_taint in tolerations
        terms = specs["lipsync-inference"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        keys = {t["matchExpressions"][0]["key"] for t in terms}
        assert {"nvidia.com/gpu.present", "cloud.google.com/gke-accelerator"} <= keys
    else:
        assert "nvidia.com" not in render_text(overlay)
        assert inference["image"] == "lipsync-inference:0.1.0-cpu"
        env = {e["name"]: e["value"] for e in inference["env"]}
        assert env["LIPSYNC_INFERENCE__EXECUTION_PROVIDERS"] == "cpu"
    # The gateway sits beside the compositing service and reaches it over localhost.
    web = [c for c in specs["lipsync-compositing"]["containers"] if c["name"] == "web"]
    assert web and web[0]["command"] == ["python", "-m", "lipsync.web"]
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "lipsync-web"


def kubernetes_validate():
    exe = shutil.which("kubernetes-validate") or str(
        Path(sys.executable).with_name("kubernetes-validate")
    )
    if not Path(exe).is_file():
        reason = "kubernetes-validate is not installed (pip install kubernetes-validate)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


@pytest.mark.parametrize("version", ["1.30", "1.37"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_strict_schema_validation(overlay, version, tmp_path):
    needs_kubectl()
    exe = kubernetes_validate()
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render_text(overlay))
    out = subprocess.run(
        [exe, "--strict", "--quiet", "-k", version, str(rendered)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # ... and strict means strict: an unknown field fails.
    bad = tmp_path / "bad.yaml"
    bogus = "enableServiceLinks: false\n      bogusField: 1"
    bad.write_text(render_text(overlay).replace("enableServiceLinks: false", bogus, 1))
    out = subprocess.run(
        [exe, "--strict", "--quiet", "-k", version, str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
