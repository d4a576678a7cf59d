"""Several inference replicas on one host, one per GPU (`python -m lipsync.local.launch
--inference-replicas N`; docs/SCALING.md): replica i listens on the inference port + i,
runs on device `inference.device_id + i` (an index into CUDA_VISIBLE_DEVICES where that
is set), serves metrics on `metrics_port + 10 i`, and, unless the configuration names
avatars to preload, preloads none: the compositing service's router places each avatar
on one replica, so the replicas' registries add up instead of all holding the same."""

from __future__ import annotations

from collections.abc import Mapping

from lipsync.config import Config


def replica_ports(cfg: Config, n: int, base_port: int | None = None) -> list[int]:
    base = base_port or cfg.inference.port
    return [base + i for i in range(max(1, n))]


def replica_env(env: Mapping[str, str], cfg: Config, i: int, n: int) -> dict[str, str]:
    """The environment of replica `i` of `n` (the base environment when n is 1)."""
    out = dict(env)
    if n <= 1:
        return out
    inf = cfg.inference
    out["LIPSYNC_INFERENCE__DEVICE_ID"] = str(inf.device_id + i)
    if inf.metrics_port:
        out["LIPSYNC_INFERENCE__METRICS_PORT"] = str(inf.metrics_port + 10 * i)
    if inf.tls.health_port:
        out["LIPSYNC_INFERENCE__TLS__HEALTH_PORT"] = str(inf.tls.health_port + i)
    if inf.registry.preload == ["*"]:
        out["LIPSYNC_INFERENCE__REGISTRY__PRELOAD"] = "[]"
    return out


def inference_address(ports: list[int], host: str = "localhost") -> str:
    """`compositing.inference_address` naming every replica."""
    return ",".join(f"{host}:{p}" for p in ports)
