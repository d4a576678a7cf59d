"""The deployment files parse and agree with the code (ports, module names, config keys)."""

from __future__ import annotations

from pathlib import Path

import yaml

from lipsync.config import from_dict

REPO = Path(__file__).resolve().parent.parent


def test_compose_file_services_and_ports():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"inference", "compositing"}
    assert "50052:50052" in compose["services"]["compositing"]["ports"]
    for svc in compose["services"].values():
        assert (REPO / svc["build"]["dockerfile"]).is_file()


def test_k8s_config_map_is_a_valid_config():
    docs = list(yaml.safe_load_all((REPO / "k8s" / "lipsync.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Deployment") == 2 and kinds.count("Service") == 2
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = from_dict(yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.compositing.inference_address.endswith(":50051")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    gpu = deployments["lipsync-inference"]
    limits = gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
