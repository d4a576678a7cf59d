"""Routing over real interfaces: three inference replicas, each in a network namespace of
its own joined to this one by a veth pair (10.231.<k>.2 inside, 10.231.<k>.1 here), one
compositing service here given the three addresses. Avatars land on one replica each;
the SIGKILL of a replica fails its calls over; a replica cut off (its link down) stops
getting new calls once its health check fails. Needs root and `ip`; the namespaces and
links are this test's own and are deleted after it."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import grpc
import pytest

from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from tests.avatar_factory import make_avatar, speech_like
from tests.conftest import service_config
from tests.routing_helpers import replica_env, start_replicas, stop_replicas

N = 3
SUBNET = 231  # 10.231.<k>.0/24


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = f"lsprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


pytestmark = pytest.mark.skipif((problem := _netns_problem()) is not None, reason=problem or "")


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=20)


class Hosts:
    """Namespaces ls<tag>n<k> with veth ls<tag>h<k> (here) <-> ls<tag>p<k> (inside)."""

    def __init__(self, n: int):
        self.tag = str(os.getpid() % 10000)
        self.n = n
        self.made: list[int] = []

    def ns(self, k: int) -> str:
        return f"ls{self.tag}n{k}"

    def host_link(self, k: int) -> str:
        return f"ls{self.tag}h{k}"

    def address(self, k: int) -> str:
        return f"10.{SUBNET}.{k + 1}.2"

    def create(self) -> None:
        for k in range(self.n):
            ns, here, there = self.ns(k), self.host_link(k), f"ls{self.tag}p{k}"
            ip("netns", "add", ns)
            self.made.append(k)
            ip("link", "add", here, "type", "veth", "peer", "name", there)
            ip("link", "set", there, "netns", ns)
            ip("addr", "add", f"10.{SUBNET}.{k + 1}.1/24", "dev", here)
            ip("link", "set", here, "up")
            ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", there)
            ip("-n", ns, "link", "set", there, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def delete(self) -> None:
        for k in self.made:
            ip("link", "del", self.host_link(k), check=False)  # takes its peer along
            ip("netns", "del", self.ns(k), check=False)
        self.made.clear()


AVATARS = [f"nx{i}" for i in range(4)]


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory, shared_encoder):
    root = tmp_path_factory.mktemp("netns_avatars")
    for i, name in enumerate(AVATARS):
        make_avatar(root, name, n_frames=4, width=160, height=160, seed=70 + i)
    hosts = Hosts(N)
    replicas = []
    comp = None
    try:
        hosts.create()
        replicas = start_replicas(
            replica_env(root, shared_encoder),
            [hosts.address(k) for k in range(N)],
            prefix=[["ip", "netns", "exec", hosts.ns(k)] for k in range(N)],
            port=50051,
        )
        from compositing_service.server import start as start_compositing

        cfg = service_config(root, shared_encoder)
        cfg.compositing.inference_address = ",".join(r.address for r in replicas)
        cfg.compositing.inference_timeout_s = 20.0
        cfg.compositing.routing.health_interval_s = 0.5
        cfg.compositing.routing.health_timeout_s = 0.5
        cfg.compositing.metrics_port = 0
        comp = start_compositing(cfg, port=0, preload=False)
        channel = grpc.insecure_channel(f"127.0.0.1:{comp.port}")
        yield cpb_grpc.CompositingServiceStub(channel), comp.servicer.inference, replicas, hosts
        channel.close()
    finally:
        if comp is not None:
            comp.stop(0)
        stop_replicas(replicas)
        hosts.delete()


def render(stub, name: str, clip, n: int = 4) -> cpb.CompositeBatchResponse:
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(model_id=name, raw_audio=clip.tobytes(), batch_size=n),
        timeout=60,
    )
    assert resp.success, resp.error
    return resp


def test_routing_and_failover_over_veth(netns_cluster):
    stub, router, replicas, hosts = netns_cluster
    clip = speech_like(1.0, seed=3)
    reference = {name: render(stub, name, clip).composited_frames for name in AVATARS}
    placed = {name: router.replicas_of(name) for name in AVATARS}
    assert all(len(p) == 1 for p in placed.values())
    assert len({p[0] for p in placed.values()}) == N  # four avatars over three hosts
    assert all(p[0].startswith(f"10.{SUBNET}.") for p in placed.values())

    # SIGKILL the replica of AVATARS[0] while requests run: none fails, frames unchanged.
    victim_addr = placed[AVATARS[0]][0]
    victim = next(r for r in replicas if r.address == victim_addr)
    errors: list[str] = []
    results: list[tuple[str, list[bytes]]] = []

    def load() -> None:
        for _ in range(6):
            for name in AVATARS:
                try:
                    results.append((name, list(render(stub, name, clip).composited_frames)))
                except (AssertionError, grpc.RpcError) as exc:
                    errors.append(f"{name}: {exc}")

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t_kill = time.monotonic()
    victim.kill()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert all(frames == list(reference[name]) for name, frames in results)
    assert router.stats.failovers >= 1 or router.endpoints.get(victim_addr).healthy is False
    assert victim_addr not in router.replicas_of(AVATARS[0])
    assert time.monotonic() - t_kill < 120

    # Cut a live replica off (its link down: no RST, packets just vanish): within a few
    # health intervals it is down, and its avatars are served elsewhere.
    alive = [r for r in replicas if r.proc.poll() is None]
    cut = alive[0]
    k = next(i for i in range(N) if hosts.address(i) == cut.host)
    ip("link", "set", hosts.host_link(k), "down")
    deadline = time.monotonic() + 10
    while router.endpoints.get(cut.address).healthy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not router.endpoints.get(cut.address).healthy
    for name in AVATARS:
        assert render(stub, name, clip).composited_frames == reference[name]
        assert cut.address not in router.replicas_of(name)
    ip("link", "set", hosts.host_link(k), "up")
