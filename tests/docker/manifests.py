"""The Kubernetes overlays rendered with `kubectl kustomize`, and the compose files read
as YAML."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("gpu", "cpu")


def kubectl_problem() -> str | None:
    """Why the overlays cannot be rendered here, or None."""
    if shutil.which("kubectl") is None:
        return "kubectl is not installed (Debian package kubectl; .ci/run installs it)"
    proc = subprocess.run(
        ["kubectl", "kustomize", "--help"], capture_output=True, timeout=30, check=False
    )
    return None if proc.returncode == 0 else "this kubectl has no `kustomize` command"


@cache
def render_text(overlay: str) -> str:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay}:\n{proc.stderr}"
    return proc.stdout


def render(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(overlay)) if d]
