"""A Kubernetes pod of the rendered manifests, started under Docker as the kubelet would
start it, and its probes run as the kubelet would run them.

What is carried over from the pod spec: each container's image (mapped to a locally built
tag), command and args, env plus the service-link variables Kubernetes injects for every
Service of the manifests (whatever enableServiceLinks says: the config loader must ignore
them) and the `kubernetes` Service's, runAsUser/runAsGroup, readOnlyRootFilesystem
(`--read-only`), dropped capabilities, allowPrivilegeEscalation: false
(no-new-privileges), memory limits, the ConfigMap's files mounted read-only where the
manifest mounts them, the avatars claim as a read-only bind mount, emptyDirs as tmpfs.
The pod's containers share one network namespace (the first container's), reachable on
a Docker bridge network under the names of the Services that select the pod.

Probes: startupProbe until it passes within initialDelaySeconds + failureThreshold x
periodSeconds (the kubelet's budget), then readinessProbe and livenessProbe must pass.
grpc probes call grpc.health.v1 Check, httpGet probes GET the path, on the pod's bridge
address.
"""

from __future__ import annotations

import re
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.docker.engine import DockerError, docker, inspect, logs

_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1000, "M": 10**6,
          "G": 10**9}


def quantity_bytes(q: str | int) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMG])?", str(q))
    if not m:
        raise ValueError(f"memory quantity {q!r}")
    return int(float(m.group(1)) * _UNITS.get(m.group(2) or "", 1))


def service_link_env(services: list[dict], cluster_ip_base: int = 12) -> dict[str, str]:
    """The variables the kubelet injects for these Services (docker-style links), plus the
    `kubernetes` Service's that every pod gets. Cluster IPs are made up: nothing is sent
    to them, they are only strings in the environment."""
    env: dict[str, str] = {}
    all_services = [
        {"metadata": {"name": "kubernetes"}, "spec": {"ports": [{"name": "https", "port": 443}]}},
        *services,
    ]
    for i, svc in enumerate(all_services):
        name = svc["metadata"]["name"].upper().replace("-", "_")
        ip = f"10.96.0.{cluster_ip_base + i}"
        ports = svc["spec"]["ports"]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        for p in ports:
            proto = p.get("protocol", "TCP")
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            prefix = f"{name}_PORT_{p['port']}_{proto}"
            env[prefix] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{prefix}_PROTO"] = proto.lower()
            env[f"{prefix}_PORT"] = str(p["port"])
            env[f"{prefix}_ADDR"] = ip
        env[f"{name}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
    return env


@dataclass
class Pod:
    name: str
    spec: dict
    containers: list[str] = field(default_factory=list)  # docker container names
    ip: str = ""

    def remove(self) -> None:
        for c in reversed(self.containers):
            docker("rm", "-f", "-v", c, timeout_s=60, check=False)


def _by_name(items: list[dict]) -> dict[str, dict]:
    return {i["name"]: i for i in items}


def start_pod(
    deployment: dict,
    docs: list[dict],
    image_map: dict[str, str],
    network: str,
    avatars_dir: Path,
    workdir: Path,
    prefix: str,
) -> Pod:
    """Start the pod of `deployment` (one replica) under Docker; see the module doc."""
    template = deployment["spec"]["template"]
    spec = template["spec"]
    pod = Pod(name=f"{prefix}-{deployment['metadata']['name']}", spec=spec)
    labels = template["metadata"].get("labels", {})
    services = [d for d in docs if d["kind"] == "Service"]
    aliases = [
        s["metadata"]["name"]
        for s in services
        if s["spec"].get("selector")
        and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
    ]
    links = service_link_env(services)
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    volumes = _by_name(spec.get("volumes", []))
    pod_sc = spec.get("securityContext", {})

    try:
        for i, c in enumerate(spec["containers"]):
            cname = f"{pod.name}-{c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            args = ["run", "-d", "--name", cname]
            if "runAsUser" in sc:
                args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
            if sc.get("readOnlyRootFilesystem"):
                args.append("--read-only")
            for cap in sc.get("capabilities", {}).get("drop", []):
                args += ["--cap-drop", cap]
            if sc.get("allowPrivilegeEscalation") is False:
                args += ["--security-opt", "no-new-privileges"]
            memory = c.get("resources", {}).get("limits", {}).get("memory")
            if memory:
                args += ["--memory", str(quantity_bytes(memory))]
            if i == 0:
                args += ["--network", network, "--hostname", pod.name]
                for a in aliases:
                    args += ["--network-alias", a]
            else:
                args += ["--network", f"container:{pod.containers[0]}"]
            env = {**links, **{e["name"]: e["value"] for e in c.get("env", [])}}
            for k, v in env.items():
                args += ["-e", f"{k}={v}"]
            for m in c.get("volumeMounts", []):
                vol = volumes[m["name"]]
                if "configMap" in vol:
                    cm = configmaps[vol["configMap"]["name"]]
                    folder = workdir / f"{pod.name}-{m['name']}"
                    folder.mkdir(exist_ok=True)
                    folder.chmod(0o755)
                    for key, text in cm["data"].items():
                        (folder / key).write_text(text)
                        (folder / key).chmod(0o644)
                    args += ["-v", f"{folder}:{m['mountPath']}:ro"]
                elif "persistentVolumeClaim" in vol:
                    claim = vol["persistentVolumeClaim"]
                    ro = ":ro" if m.get("readOnly") or claim.get("readOnly") else ""
                    args += ["-v", f"{avatars_dir}:{m['mountPath']}{ro}"]
                elif "emptyDir" in vol:
                    size = vol["emptyDir"].get("sizeLimit")
                    opts = "rw,exec,mode=1777" + (f",size={quantity_bytes(size)}" if size else "")
                    args += ["--tmpfs", f"{m['mountPath']}:{opts}"]
                else:
                    raise AssertionError(f"volume kind not handled by the test: {vol}")
            image = c["image"]
            if image.rsplit(":", 1)[0] not in image_map:
                raise AssertionError(f"no local image for {image}")
            command = list(c.get("command", [])) + list(c.get("args", []))
            if command:
                args += ["--entrypoint", command[0], image_map[image.rsplit(":", 1)[0]],
                         *command[1:]]
            else:
                args.append(image_map[image.rsplit(":", 1)[0]])
            docker(*args, timeout_s=60)
            pod.containers.append(cname)
        pod.ip = inspect(pod.containers[0])["NetworkSettings"]["Networks"][network]["IPAddress"]
    except BaseException:
        pod.remove()
        raise
    return pod


def _port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"{container['name']} has no port named {port}")


def probe_once(ip: str, container: dict, probe: dict) -> str | None:
    """One probe, as the kubelet runs it: None when it passes, else why not."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if "grpc" in probe:
        port = int(probe["grpc"]["port"])
        with grpc.insecure_channel(f"{ip}:{port}") as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                    timeout=timeout,
                )
            except grpc.RpcError as exc:
                return f"grpc {port}: {exc.code().name}"
        ok = resp.status == health_pb2.HealthCheckResponse.SERVING
        return None if ok else f"grpc {port}: status {resp.status}"
    if "httpGet" in probe:
        h = probe["httpGet"]
        url = f"http://{ip}:{_port(container, h['port'])}{h.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return None if 200 <= resp.status < 400 else f"{url}: {resp.status}"
        except OSError as exc:
            return f"{url}: {exc}"
    raise AssertionError(f"probe kind not handled by the test: {probe}")


def wait_ready(pod: Pod, poll_s: float = 0.5) -> dict[str, float]:
    """Run each container's startup, readiness and liveness probes; the seconds each
    container took to pass its startup probe. DockerError with the logs when the
    kubelet would have given up (or restarted the container)."""
    started: dict[str, float] = {}
    t0 = time.monotonic()
    for c, cname in zip(pod.spec["containers"], pod.containers, strict=True):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                if kind == "startupProbe":
                    continue
                raise AssertionError(f"{pod.name}/{c['name']} has no {kind}")
            budget = float(probe.get("initialDelaySeconds", 0)) + float(
                probe.get("failureThreshold", 3)
            ) * float(probe.get("periodSeconds", 10))
            deadline = time.monotonic() + budget
            while True:
                state = inspect(cname)["State"]
                if not state.get("Running"):
                    raise DockerError(
                        f"{cname} exited ({state.get('ExitCode')}) before its {kind} passed:\n"
                        f"{logs(cname)}"
                    )
                why = probe_once(pod.ip, c, probe)
                if why is None:
                    break
                if time.monotonic() > deadline:
                    raise DockerError(
                        f"{cname}: {kind} still failing after {budget:.0f} s ({why}):\n"
                        f"{logs(cname)}"
                    )
                time.sleep(min(poll_s, float(probe.get("periodSeconds", 10))))
            if kind == "startupProbe":
                started[c["name"]] = time.monotonic() - t0
    return started


def scratch_dir() -> Path:
    """A folder the containers' users (uid 10001) can read bind mounts from."""
    d = Path(tempfile.mkdtemp(prefix="lipsync-pods-"))
    d.chmod(0o755)
    return d

