"""Inference replicas as subprocesses (`python -m inference_service`) for the routing
tests, on loopback or inside a network namespace."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lipsync.local.launch import stop_processes
from lipsync.rpc.channel import wait_healthy

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_env(avatars_root: Path, shared_encoder: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AVATARS_DIR": str(avatars_root),
            "LIPSYNC_INFERENCE__REGISTRY__PRELOAD": "[]",
            "LIPSYNC_INFERENCE__EXECUTION_PROVIDERS": "cpu",
            "LIPSYNC_INFERENCE__INTRA_OP_THREADS": "1",
            "LIPSYNC_INFERENCE__MAX_WORKERS": "8",
            "LIPSYNC_INFERENCE__METRICS_PORT": "0",
            "LIPSYNC_LIMITS__MAX_BATCH_SIZE": "32",
            "LIPSYNC_LIMITS__MAX_AUDIO_SECONDS": "30",
            "LIPSYNC_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
        }
    )
    if shared_encoder is not None:
        env["LIPSYNC_INFERENCE__SHARED_AUDIO_ENCODER"] = str(shared_encoder)
    return env


@dataclass
class Replica:
    host: str
    port: int
    proc: subprocess.Popen

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def start_replicas(
    env: dict[str, str],
    hosts: list[str],
    prefix: list[list[str]] | None = None,
    port: int | None = None,
    timeout_s: float = 90.0,
) -> list[Replica]:
    """One `python -m inference_service` per host (each bound to its host), healthy.
    `prefix[i]`: a command put before replica i's (e.g. `ip netns exec NAME`)."""
    out: list[Replica] = []
    try:
        for i, host in enumerate(hosts):
            p = port or free_port(host)
            cmd = [sys.executable, "-m", "inference_service", "--port", str(p)]
            e = dict(env, LIPSYNC_INFERENCE__HOST=host)
            proc = subprocess.Popen(
                [*(prefix[i] if prefix else []), *cmd],
                env=e,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            out.append(Replica(host, p, proc))
        for r in out:
            wait_healthy(r.address, timeout_s, r.proc)
    except BaseException:
        stop_replicas(out)
        raise
    return out


def stop_replicas(replicas: list[Replica]) -> None:
    stop_processes((r.proc for r in replicas), 10)
