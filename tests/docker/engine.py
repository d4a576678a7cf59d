"""Docker and Compose from the tests: is an engine there, run a command with a time limit,
wait for a container's health.

Every call has a timeout; every wait is bounded. The tests talk to containers only on
127.0.0.1 (published ports) or on the addresses of Docker's local bridge networks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STANDIN_SCRIPT = REPO / "tests" / "docker" / "standin_base.sh"
# CI sets it (.ci/run): there a missing engine is a failure, not a skip.
REQUIRE_ENV = "LIPSYNC_REQUIRE_DOCKER"


class DockerError(RuntimeError):
    pass


def run(
    args: list[str],
    timeout_s: float,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """Run a command (output captured); DockerError with its output when it fails."""
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-4000:] if isinstance(exc.stdout, bytes) else exc.stdout
        raise DockerError(f"{' '.join(args)} ran past {timeout_s:.0f} s:\n{out}") from exc
    if check and proc.returncode != 0:
        raise DockerError(
            f"{' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def docker(*args: str, timeout_s: float = 60.0, check: bool = True) -> str:
    return run(["docker", *args], timeout_s, check=check).stdout.strip()


def engine_problem() -> str | None:
    """Why Docker cannot be used here, or None when a daemon answers."""
    if shutil.which("docker") is None:
        return "docker is not installed (apt-get install docker.io; .ci/run does)"
    try:
        proc = run(["docker", "info", "--format", "{{.ServerVersion}}"], 20, check=False)
    except DockerError:
        return "docker info did not answer within 20 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        return "no Docker daemon answers (start dockerd; .ci/run does)"
    return None


def compose_command() -> list[str] | None:
    """Compose v1 (`docker-compose`, Debian's 1.29.2) if installed, else Compose v2."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    proc = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=20, check=False
    )
    return ["docker", "compose"] if proc.returncode == 0 else None


def standin_base(timeout_s: float = 900.0) -> str:
    """The tag of the test-only base image (built once, then cached by its tag)."""
    tag = os.environ.get("LIPSYNC_STANDIN_BASE")
    if tag and docker("image", "ls", "-q", tag, timeout_s=20):
        return tag
    return run(["bash", str(STANDIN_SCRIPT)], timeout_s).stdout.strip().splitlines()[-1]


def inspect(container: str) -> dict:
    return json.loads(docker("inspect", container, timeout_s=20))[0]


def logs(container: str, tail: int = 60) -> str:
    proc = run(["docker", "logs", "--tail", str(tail), container], 20, check=False)
    return (proc.stdout + proc.stderr)[-5000:]


def wait_healthy(containers: list[str], timeout_s: float) -> None:
    """Until every container's HEALTHCHECK says healthy; DockerError when one exits or
    turns unhealthy, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    pending = list(containers)
    while pending:
        for c in list(pending):
            state = inspect(c)["State"]
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                pending.remove(c)
            elif not state.get("Running") or health == "unhealthy":
                raise DockerError(f"{c}: {state.get('Status')} / {health}\n{logs(c)}")
        if pending and time.monotonic() > deadline:
            raise DockerError(
                f"not healthy after {timeout_s:.0f} s: {pending}\n"
                + "\n".join(f"--- {c}\n{logs(c)}" for c in pending)
            )
        if pending:
            time.sleep(1.0)
