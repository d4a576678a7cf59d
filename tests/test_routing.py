"""Routing of inference calls over several replicas (compositing_service/routing.py):
the policy on stand-in clients, then three real inference replicas (subprocesses, no
preload) behind one compositing service: six avatars each end up on exactly one replica
with every frame right, and an offline stream survives the SIGKILL of its replica."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from compositing_service.endpoints import Target, parse_targets, resolve
from compositing_service.inference_client import InferCall, Mouths
from compositing_service.routing import (
    NoReplicaError,
    RoutedInferenceClient,
    rendezvous_score,
)
from lipsync.client import chunked, clip_requests
from lipsync.config import RoutingConfig
from lipsync.core import audio, windows
from lipsync.proto import common_pb2 as common
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from tests.avatar_factory import make_avatar, speech_like
from tests.conftest import service_config
from tests.oracle import Oracle, decode_jpeg, jpeg_roundtrip, psnr
from tests.routing_helpers import replica_env, start_replicas, stop_replicas


# -- the policy, on stand-in replicas ---------------------------------------------------
class Dead(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "gone"


class FakeClient:
    """A replica that answers after `delay_s`, or fails UNAVAILABLE once `dead`."""

    def __init__(self, address: str, delay_s: float = 0.0):
        self.address = address
        self.delay_s = delay_s
        self.dead = False
        self.loaded: set[str] = set()
        self.calls = 0
        self.log: list[tuple[int, float]] = []  # (calling thread, time) of each call
        self.received: list[InferCall] = []

    def infer(self, call: InferCall):
        if self.dead:
            raise Dead()
        self.calls += 1
        self.received.append(call)
        self.loaded.add(call.model_id)
        self.log.append((threading.get_ident(), time.monotonic()))
        time.sleep(self.delay_s)
        return Mouths(np.zeros((call.batch_size, 1), np.uint8), {}, 0, "fake", 0)

    def healthy(self, timeout_s=1.0):
        return not self.dead

    def list_models(self):
        return common.ListModelsResponse(
            models=[common.ModelInfo(model_id=m, loaded=True) for m in sorted(self.loaded)]
        )

    def load_model(self, model_id):
        self.loaded.add(model_id)
        return common.LoadModelResponse(success=True)

    def unload_model(self, model_id):
        self.loaded.discard(model_id)
        return common.UnloadModelResponse(success=True)

    def model_stats(self, model_id="", timeout_s=None):
        return common.GetModelStatsResponse(loaded_models=len(self.loaded), max_models=8)

    def close(self):
        pass


def fake_router(n: int, delay_s: float = 0.0, **policy) -> tuple[RoutedInferenceClient, dict]:
    fakes: dict[str, FakeClient] = {}

    def make(address: str) -> FakeClient:
        # the endpoint set may open a fresh client to probe a replica; keep one per address
        return fakes.setdefault(address, FakeClient(address, delay_s))

    address = ",".join(f"10.0.0.{i + 1}:50051" for i in range(n))
    router = RoutedInferenceClient(
        address,
        1 << 20,
        5.0,
        "uint8",
        routing=RoutingConfig(**policy),
        make_client=make,  # type: ignore[arg-type]
        start_threads=False,
    )
    return router, fakes


def test_targets_parse_lists_and_dns_names():
    ts = parse_targets("a:1, dns:///svc.ns:50051,[::1]:7,a:1")
    assert ts == [Target("a", 1), Target("svc.ns", 50051, True), Target("::1", 7)]
    assert resolve(Target("127.0.0.1", 9)) == ["127.0.0.1:9"]
    local = resolve(Target("localhost", 9, dns=True))
    assert local and all(a.endswith(":9") for a in local)
    with pytest.raises(ValueError):
        parse_targets("nohost")


def test_cold_avatars_spread_evenly_and_stick():
    router, fakes = fake_router(3)
    for m in "abcdef":
        router.infer(InferCall(m, 1))
    placed = {m: router.replicas_of(m) for m in "abcdef"}
    assert all(len(r) == 1 for r in placed.values())
    per_replica = {a: sum(r == [a] for r in placed.values()) for a in fakes}
    assert sorted(per_replica.values()) == [2, 2, 2]
    for _ in range(3):  # the same replica every time (a stream stays on one replica)
        for m in "abcdef":
            router.infer(InferCall(m, 1))
            assert router.replicas_of(m) == placed[m]
    assert router.stats.hits == 18 and router.stats.cold == 6
    assert {a: len(f.loaded) for a, f in fakes.items()} == per_replica


def test_cold_choices_keep_independent_routers_on_the_same_replicas():
    placed = []
    for busy in (0, 3):  # two routers whose loads differ
        router, fakes = fake_router(4, cold_choices=2)
        for ep in router.endpoints.all()[:busy]:
            ep.inflight = 5
        for m in range(20):
            router.infer(InferCall(f"m{m}", 1))
        placed.append({f"m{m}": router.replicas_of(f"m{m}")[0] for m in range(20)})
    for m in placed[0]:
        ranked = sorted(fakes, key=lambda a: -rendezvous_score(m, a))[:2]
        assert placed[0][m] in ranked and placed[1][m] in ranked


def test_hot_avatar_spreads_past_the_bound_and_is_drawn_back():
    router, fakes = fake_router(4, delay_s=0.05, spread_min_inflight=2, spread_after=1, cool_s=0.2)
    threads = [threading.Thread(target=router.infer, args=(InferCall("hot", 1),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8 in flight; the bound: max(2, 1.25 x the average in flight) -> 3 replicas
    n = len(router.replicas_of("hot"))
    assert n == 3 and sum(f.calls > 0 for f in fakes.values()) == n
    now = time.monotonic() + 0.25  # the cool-down aged on the router's clock, not waited
    drawn = router.draw_back(now=now)
    assert len(drawn) == 1 and len(router.replicas_of("hot")) == n - 1
    assert "hot" not in fakes[drawn[0][1]].loaded  # unloaded there
    assert router.draw_back(now=now) == []  # one replica per cool_s
    for _ in range(3):
        now += 0.25
        router.draw_back(now=now)
    assert len(router.replicas_of("hot")) == 1


def test_a_stream_thread_keeps_its_replica_while_its_avatar_is_spread():
    router, fakes = fake_router(3, delay_s=0.02, spread_min_inflight=2, spread_after=1)
    threads = [
        threading.Thread(target=lambda: [router.infer(InferCall("hot", 1)) for _ in range(15)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(router.replicas_of("hot")) >= 2  # spread
    calls: dict[int, list[tuple[float, str]]] = {}
    for f in fakes.values():
        for ident, t in f.log:
            calls.setdefault(ident, []).append((t, f.address))
    assert len(calls) == 8
    # each caller (a stream runs on a thread of its own) moved at most once, when the
    # avatar spread; then it kept its replica
    for seq in calls.values():
        order = [a for _, a in sorted(seq)]
        assert sum(x != y for x, y in itertools.pairwise(order)) <= 1, order


def test_a_spread_stops_at_max_replicas_per_avatar():
    placed = {}
    for cap in (2, 0):
        router, _ = fake_router(
            4, spread_min_inflight=1, spread_after=1, max_replicas_per_avatar=cap
        )
        router.infer(InferCall("hot", 1))
        for _ in range(3):  # every replica of the avatar busy: a spread each time, up to the cap
            for a in router.replicas_of("hot"):
                router.endpoints.get(a).inflight = 10
            router._affinity.clear()  # a new caller (one thread would keep its replica)
            router.infer(InferCall("hot", 1))
        placed[cap] = len(router.replicas_of("hot"))
        assert router.stats.spreads == placed[cap] - 1
    assert placed == {2: 2, 0: 4}


def test_a_call_reaches_its_replica_whole():
    """The router passes the caller's InferCall, deadline included, to the replica's client."""
    router, fakes = fake_router(3)
    call = InferCall("a", 2, audio_features=bytes(8), clip_frame_offset=7, deadline=123.0)
    router.infer(call)
    (address,) = router.replicas_of("a")
    assert fakes[address].received == [call] and fakes[address].received[0] is call


def test_failover_on_unavailable_and_no_replica_left():
    router, fakes = fake_router(2)
    router.infer(InferCall("a", 2))
    (first,) = router.replicas_of("a")
    fakes[first].dead = True
    router.infer(InferCall("a", 2))  # runs again on the other replica
    (second,) = router.replicas_of("a")
    assert second != first and router.stats.failovers == 1
    assert not router.endpoints.get(first).healthy
    fakes[second].dead = True
    with pytest.raises(grpc.RpcError) as err:
        router.infer(InferCall("a", 2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    fakes[first].dead = False  # back: the next health check finds it
    router.endpoints.check_health()
    router.infer(InferCall("a", 2))
    assert router.replicas_of("a") == [first]
    fakes[first].dead = fakes[second].dead = True
    router.endpoints.check_health()
    with pytest.raises(NoReplicaError):
        router.infer(InferCall("b", 1))


def test_admin_fans_out_and_adds_up():
    router, fakes = fake_router(3)
    for m in "abc":
        router.load_model(m)
    assert sorted(len(f.loaded) for f in fakes.values()) == [1, 1, 1]
    listed = router.list_models()
    assert [(m.model_id, m.loaded) for m in listed.models] == [(m, True) for m in "abc"]
    stats = router.model_stats()
    assert stats.max_models == 24 and stats.loaded_models == 3  # capacities add up
    router.unload_model("a")
    assert not any("a" in f.loaded for f in fakes.values()) and router.replicas_of("a") == []


def test_a_restarted_router_adopts_where_avatars_are():
    router, fakes = fake_router(3)
    addresses = list(fakes)
    fakes[addresses[2]].loaded.add("x")
    router.sync()
    assert router.replicas_of("x") == [addresses[2]]
    router.infer(InferCall("x", 1))
    assert fakes[addresses[2]].calls == 1 and router.stats.hits == 1


def test_new_replica_from_dns_gets_cold_work():
    names = {"svc": ["10.0.0.1:1"]}

    def resolver(t: Target) -> list[str]:
        return names[t.host]

    fakes: dict[str, FakeClient] = {}
    router = RoutedInferenceClient(
        "dns:///svc:1",
        1 << 20,
        5.0,
        "uint8",
        make_client=lambda a: fakes.setdefault(a, FakeClient(a)),  # type: ignore[arg-type,return-value]
        start_threads=False,
        resolver=resolver,
    )
    router.infer(InferCall("a", 1))
    names["svc"] = ["10.0.0.1:1", "10.0.0.2:1"]
    router.endpoints.refresh()
    router.infer(InferCall("b", 1))
    assert router.replicas_of("b") == ["10.0.0.2:1"]
    names["svc"] = ["10.0.0.2:1"]
    router.endpoints.refresh()
    router.infer(InferCall("a", 1))  # its replica left the name: placed again
    assert router.replicas_of("a") == ["10.0.0.2:1"]


# -- three real replicas ------------------------------------------------------------------
AVATARS = [f"av{i}" for i in range(6)]
QUALITY = 95


@pytest.fixture(scope="module")
def six_avatars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("six_avatars")
    for i, name in enumerate(AVATARS):
        make_avatar(root, name, n_frames=5, width=160 + 8 * i, height=176, seed=40 + i)
    return root


@pytest.fixture(scope="module")
def cluster(six_avatars, shared_encoder):
    replicas = start_replicas(replica_env(six_avatars, shared_encoder), ["127.0.0.1"] * 3)
    from compositing_service.server import start as start_compositing

    cfg = service_config(six_avatars, shared_encoder)
    cfg.compositing.inference_address = ",".join(r.address for r in replicas)
    cfg.compositing.routing.health_interval_s = 0.5
    cfg.compositing.metrics_port = 0
    cfg.compositing.stream.max_queued_frames = 8  # the stream is mid-way when we kill
    cfg.compositing.stream.max_batch = 4
    comp = start_compositing(cfg, port=0, preload=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{comp.port}")
    yield cpb_grpc.CompositingServiceStub(channel), comp.servicer.inference, replicas
    channel.close()
    comp.stop(0)
    stop_replicas(replicas)


def loaded_on(replica) -> set[str]:
    from lipsync.proto import inference_pb2_grpc as ipb_grpc

    with grpc.insecure_channel(replica.address) as ch:
        resp = ipb_grpc.InferenceServiceStub(ch).ListModels(common.ListModelsRequest(), timeout=5)
    return {m.model_id for m in resp.models if m.loaded}


def test_each_avatar_lands_on_exactly_one_replica_with_right_frames(cluster, six_avatars):
    stub, router, replicas = cluster
    clip = speech_like(1.2, seed=7)
    for round_ in range(2):
        for name in AVATARS:
            resp = stub.InferBatchComposite(
                cpb.CompositeBatchRequest(
                    model_id=name, raw_audio=clip.tobytes(), batch_size=6, start_frame_idx=round_
                )
            )
            assert resp.success, resp.error
            if round_ == 0:
                expected = Oracle(six_avatars / name).clip_frames(clip, batch=6, start=0, offset=0)
                worst = min(
                    psnr(decode_jpeg(j), jpeg_roundtrip(e, QUALITY))
                    for j, e in zip(resp.composited_frames, expected, strict=True)
                )
                assert worst >= 50.0, f"{name}: worst-frame PSNR {worst:.1f} dB"
    held = [loaded_on(r) for r in replicas]
    for name in AVATARS:
        assert sum(name in h for h in held) == 1, (name, held)
    assert all(h for h in held)  # every replica got work
    assert router.stats.failovers == 0


def offline_frames(stub, name: str, clip: np.ndarray, start: int) -> list[bytes]:
    n = windows.clip_frame_count(1 + len(clip) // audio.HOP)
    out: list[bytes] = []
    for k in range(0, n, 32):
        resp = stub.InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id=name,
                raw_audio=clip.tobytes(),
                batch_size=min(32, n - k),
                start_frame_idx=start + k,
                clip_frame_offset=k,
            )
        )
        assert resp.success, resp.error
        out.extend(resp.composited_frames)
    return out


def test_stream_survives_sigkill_of_its_replica(cluster):
    stub, router, replicas = cluster
    name = AVATARS[1]
    clip = speech_like(3.0, seed=11)
    stub.InferBatchComposite(  # placed (and loaded) before the stream starts
        cpb.CompositeBatchRequest(model_id=name, raw_audio=clip[:16000].tobytes(), batch_size=1)
    )
    (serving,) = router.replicas_of(name)
    victim = next(r for r in replicas if r.address == serving)

    def requests():
        start = cpb.StreamStart(model_id=name, start_frame_idx=2)
        return clip_requests(start, [chunked(clip, 4000)])

    streamed: list[cpb.StreamFrame] = []
    t_kill = None
    for frame in stub.StreamComposite(requests(), timeout=120):
        streamed.append(frame)
        if len(streamed) == 5:
            victim.kill()
            t_kill = time.monotonic()
    assert t_kill is not None
    assert router.stats.failovers >= 1
    assert router.replicas_of(name) and router.replicas_of(name)[0] != serving
    assert [f.index for f in streamed] == list(range(len(streamed)))
    offline = offline_frames(stub, name, clip, start=2)
    assert len(streamed) == len(offline)
    worst = min(
        psnr(decode_jpeg(f.jpeg), decode_jpeg(o)) for f, o in zip(streamed, offline, strict=True)
    )
    assert worst >= 45.0, f"worst-frame PSNR {worst:.1f} dB"
