"""The multi-replica deployment files (docs/SCALING.md): the multi-gpu overlay renders and
passes strict schema validation like the other overlays, with a headless Service the
compositing service resolves; the multi-GPU compose file gives each replica its own GPU;
`lipsync.local.launch --inference-replicas` gives each replica its own device and ports."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from compositing_service.endpoints import parse_targets
from lipsync.config import load_config
from lipsync.local.replica_env import inference_address, replica_env, replica_ports
from tests.docker.manifests import REPO, render_text
from tests.test_deploy_files import kubernetes_validate, needs_kubectl

OVERLAY = "multi-gpu"


def test_multi_gpu_overlay_routes_over_a_headless_service():
    needs_kubectl()
    docs = [d for d in yaml.safe_load_all(render_text(OVERLAY)) if d]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services["lipsync-inference-replicas"]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"] == {"app.kubernetes.io/name": "lipsync-inference"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    inference = deployments["lipsync-inference"]["spec"]
    assert inference["replicas"] >= 2
    (inf,) = inference["template"]["spec"]["containers"]
    assert inf["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in inf["env"]}
    assert env["LIPSYNC_INFERENCE__REGISTRY__PRELOAD"] == "[]"
    comp = next(
        c
        for c in deployments["lipsync-compositing"]["spec"]["template"]["spec"]["containers"]
        if c["name"] == "compositing"
    )
    env = {e["name"]: e.get("value") for e in comp["env"]}
    (target,) = parse_targets(env["INFERENCE_ADDRESS"])
    assert target.dns and target.host == "lipsync-inference-replicas" and target.port == 50051


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_multi_gpu_overlay_passes_strict_schema_validation(version, tmp_path):
    needs_kubectl()
    exe = kubernetes_validate()
    rendered = tmp_path / "multi-gpu.yaml"
    rendered.write_text(render_text(OVERLAY))
    out = subprocess.run(
        [exe, "--strict", "--quiet", "-k", version, str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_multigpu_compose_gives_each_replica_its_gpu_and_the_router_all():
    doc = yaml.safe_load((REPO / "deploy" / "compose.multigpu.yml").read_text())
    services = doc["services"]
    replicas = sorted(k for k in services if k.startswith("inference"))
    ids = []
    for name in replicas:
        (dev,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        ids += dev["device_ids"]
        assert services[name]["environment"]["LIPSYNC_INFERENCE__REGISTRY__PRELOAD"] == "[]"
    assert sorted(ids) == [str(i) for i in range(len(replicas))]
    targets = parse_targets(services["compositing"]["environment"]["INFERENCE_ADDRESS"])
    assert sorted(t.host for t in targets) == replicas


def test_launch_replicas_get_their_device_ports_and_no_preload():
    cfg = load_config(env={})
    ports = replica_ports(cfg, 3)
    assert ports == [50051, 50052, 50053]
    envs = [replica_env({}, cfg, i, 3) for i in range(3)]
    assert [e["LIPSYNC_INFERENCE__DEVICE_ID"] for e in envs] == ["0", "1", "2"]
    assert [e["LIPSYNC_INFERENCE__METRICS_PORT"] for e in envs] == ["9101", "9111", "9121"]
    assert all(e["LIPSYNC_INFERENCE__REGISTRY__PRELOAD"] == "[]" for e in envs)
    assert replica_env({"A": "1"}, cfg, 0, 1) == {"A": "1"}  # one replica: as before
    assert inference_address(ports) == "localhost:50051,localhost:50052,localhost:50053"
