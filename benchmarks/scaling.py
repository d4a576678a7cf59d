"""Scale-out figures (docs/SCALING.md): routing over N inference replicas, and 1,000
avatars under one root.

    python -m benchmarks.scaling routing [--replicas 1,2,4,8] [--delay-ms 25] [--seconds 4]
    python -m benchmarks.scaling avatars [--count 1000] [--template avatars/demo]

`routing`: the compositing service's router (compositing_service/routing.py) and its real
per-replica gRPC clients in front of STAND-IN inference replicas (separate processes,
`standin` below): each is a simulated GPU that runs one call at a time and answers after
a fixed delay (`--delay-ms`), with `--load-ms` more the first time it sees an avatar; it
returns real-sized uint8 mouths. No network model runs. Load: `4 N` client threads
calling avatars drawn Zipf(1.1) from `--avatars`. Reported: aggregate calls/s against N x
one replica's, the router's time per call, the share of calls sent to a replica already
holding the avatar, what a SIGKILL of a replica costs, how soon a new replica gets work.

`avatars`: `--count` avatars (the demo avatar's 75 JPEG frames of 512x512 and tiny test
networks, hard-linked so the disk holds one copy) behind two real inference replicas and
one compositing service (`lipsync.local.launch.ServiceProcesses`, CPU): startup time and
memory, ListModels and catalog rescan with every avatar, cold first-frame latency,
memory per held avatar, churn over every avatar.

Every loop is bounded in count and time; all traffic is on loopback. JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from compositing_service.endpoints import Target, resolve
from compositing_service.inference_client import InferCall
from compositing_service.routing import RoutedInferenceClient
from lipsync.config import RoutingConfig
from lipsync.core.tensors import BLOCK_BYTES, INNER
from lipsync.local.launch import stop_processes
from lipsync.local.ports import free_port
from lipsync.proto import common_pb2 as common
from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.rpc.channel import wait_healthy
from lipsync.serving.grpc_server import add_health, bind, create_server

REPO = Path(__file__).resolve().parent.parent
MAX_MSG = 64 << 20


# -- the stand-in replica ----------------------------------------------------------------
class StandIn(ipb_grpc.InferenceServiceServicer):
    """A simulated GPU: one call at a time, `delay_s` each (+ `load_s` for a new avatar)."""

    def __init__(self, delay_s: float, load_s: float):
        self.delay_s, self.load_s = delay_s, load_s
        self.gpu = threading.Lock()
        self.loaded: set[str] = set()
        self.calls = self.loads = 0
        self.payload = {b: bytes(b * INNER * INNER * 3) for b in (1, 2, 4, 8)}

    def Infer(self, request, context):
        with self.gpu:
            if request.model_id not in self.loaded:
                time.sleep(self.load_s)
                self.loaded.add(request.model_id)
                self.loads += 1
            time.sleep(self.delay_s)
            self.calls += 1
        b = request.batch_size
        return ipb.InferResponse(
            mouths=self.payload.get(b) or bytes(b * INNER * INNER * 3),
            output_type=ipb.UINT8,
            batch_size=b,
            execution_provider="stand-in",
        )

    def ListModels(self, request, context):
        return common.ListModelsResponse(
            models=[common.ModelInfo(model_id=m, loaded=True) for m in sorted(self.loaded)]
        )

    def LoadModel(self, request, context):
        self.loaded.add(request.model_id)
        return common.LoadModelResponse(success=True)

    def UnloadModel(self, request, context):
        self.loaded.discard(request.model_id)
        return common.UnloadModelResponse(success=True)

    def GetModelStats(self, request, context):
        return common.GetModelStatsResponse(
            loaded_models=len(self.loaded), max_models=self.calls, loaded_bytes=self.loads
        )


def standin_main(port: int, delay_ms: float, load_ms: float) -> None:
    server = create_server(16, MAX_MSG)
    ipb_grpc.add_InferenceServiceServicer_to_server(StandIn(delay_ms / 1e3, load_ms / 1e3), server)
    add_health(server, [])
    bind(server, "127.0.0.1", port)
    server.start()
    server.wait_for_termination()  # SIGTERM ends the process


def spawn_standin(delay_ms: float, load_ms: float) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.scaling", "standin", "--port", str(port)]
    cmd += ["--delay-ms", str(delay_ms), "--load-ms", str(load_ms)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    wait_healthy(address, 60, proc)
    return address, proc


def stop(procs: list[subprocess.Popen]) -> None:
    stop_processes(procs, 10)


# -- load ----------------------------------------------------------------------------------
def zipf_names(n: int, s: float = 1.1) -> tuple[list[str], list[float]]:
    names = [f"avatar{i:04d}" for i in range(n)]
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    return names, weights


class Load:
    """`threads` callers of `router.infer` until `stop`; every call's (start, end, ok)."""

    def __init__(self, router, names, weights, threads: int, seed: int = 0):
        self.router, self.names, self.weights = router, names, weights
        self.stop_at = 0.0
        self.records: list[tuple[float, float, bool]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(seed + i,), daemon=True)
            for i in range(threads)
        ]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        features = bytes(BLOCK_BYTES)
        while time.monotonic() < self.stop_at:
            (name,) = rng.choices(self.names, self.weights)
            t0 = time.monotonic()
            ok = True
            try:
                self.router.infer(InferCall(name, 1, audio_features=features))
            except grpc.RpcError as exc:
                ok = False
                with self.lock:
                    self.errors.append(str(exc.code()))
            with self.lock:
                self.records.append((t0, time.monotonic(), ok))

    def run(self, seconds: float) -> Load:
        self.stop_at = time.monotonic() + seconds
        for t in self.threads:
            t.start()
        return self

    def join(self) -> Load:
        for t in self.threads:
            t.join(60)
        return self


def make_router(
    address: str,
    health_interval_s: float = 1.0,
    refresh_s: float = 5.0,
    resolver: Callable[[Target], list[str]] = resolve,
) -> RoutedInferenceClient:
    return RoutedInferenceClient(
        address,
        MAX_MSG,
        30.0,
        "uint8",
        routing=RoutingConfig(cool_s=5.0, health_interval_s=health_interval_s, refresh_s=refresh_s),
        resolver=resolver,
    )


def throughput(n: int, args) -> dict:
    addrs, procs = zip(*[spawn_standin(args.delay_ms, args.load_ms) for _ in range(n)], strict=True)
    names, weights = zipf_names(args.avatars)
    router = make_router(",".join(addrs))
    try:
        # warm: channels, and every avatar placed once (a first touch misses anywhere)
        feats = bytes(BLOCK_BYTES)
        with ThreadPoolExecutor(4 * n) as pool:
            list(pool.map(lambda m: router.infer(InferCall(m, 1, audio_features=feats)), names))
        Load(router, names, weights, threads=4 * n).run(args.warm_seconds).join()
        base = router.stats.calls, router.stats.hits, router.stats.cold
        load = Load(router, names, weights, threads=4 * n, seed=100).run(args.seconds).join()
        done = [r for r in load.records if r[2]]
        calls, hits = router.stats.calls - base[0], router.stats.hits - base[1]
        first_touch = router.stats.cold - base[2]
        lat = sorted(e - s for s, e, _ in done)
        held = sum(len(router.endpoints.get(a).client.list_models().models) for a in addrs)
        return {
            "replicas": n,
            "calls_per_s": len(done) / args.seconds,
            "errors": len(load.errors),
            "hit_share": hits / max(1, calls),
            "first_touches": first_touch,  # avatars no replica had seen: a miss anyway
            "hit_share_of_the_rest": hits / max(1, calls - first_touch),
            "latency_ms_p50": 1e3 * lat[len(lat) // 2],
            "latency_ms_p95": 1e3 * lat[int(len(lat) * 0.95)],
            "avatars_held_total": held,
            "avatars_seen": len(router.placement),
            "spreads": router.stats.spreads,
            "per_replica_calls": sorted(router.stats.per_endpoint.values()),
        }
    finally:
        router.close()
        stop(list(procs))


def overhead(args) -> dict:
    """The router's own time per call: acquire + release over 8 endpoints, in process; and
    a routed vs a direct call to one stand-in that answers at once."""
    from compositing_service.inference_client import InferenceClient

    address, proc = spawn_standin(0.0, 0.0)
    try:
        fakes = ",".join(f"10.0.0.{i}:1" for i in range(8))
        r = RoutedInferenceClient(
            fakes, MAX_MSG, 1.0, "uint8", start_threads=False, make_client=_Healthy
        )
        names, _ = zipf_names(200)
        n = 50_000
        t0 = time.perf_counter()
        for i in range(n):
            ep = r.acquire(names[i % 200])
            r.release(names[i % 200], ep)
        pick_us = (time.perf_counter() - t0) / n * 1e6
        direct = InferenceClient(address, MAX_MSG, 10.0, "uint8")
        routed = make_router(address)
        feats = bytes(BLOCK_BYTES)
        rounds: dict[str, list[float]] = {"direct": [], "routed": []}
        for _ in range(6):  # alternated: the machine is noisy
            for label, client in (("direct", direct), ("routed", routed)):
                for _ in range(30):
                    client.infer(InferCall("a", 1, audio_features=feats))
                t = time.perf_counter()
                for _ in range(300):
                    client.infer(InferCall("a", 1, audio_features=feats))
                rounds[label].append((time.perf_counter() - t) / 300 * 1e3)
        routed.close()
        direct.close()
        return {
            "router_pick_release_us": pick_us,
            "call_ms_direct_median": statistics.median(rounds["direct"]),
            "call_ms_routed_median": statistics.median(rounds["routed"]),
            "rounds_ms": {k: [round(x, 3) for x in v] for k, v in rounds.items()},
        }
    finally:
        stop([proc])


class _Healthy:
    def __init__(self, address: str):
        self.address = address

    def healthy(self, timeout_s: float = 1.0) -> bool:
        return True

    def close(self) -> None:
        pass


def failover(args, n: int = 3) -> dict:
    addrs, procs = zip(*[spawn_standin(args.delay_ms, args.load_ms) for _ in range(n)], strict=True)
    names, weights = zipf_names(args.avatars)
    router = make_router(",".join(addrs), health_interval_s=0.5)
    try:
        load = Load(router, names, weights, threads=4 * n).run(4.0)
        time.sleep(2.0)
        victim = router.replicas_of(names[0])[0]
        t_kill = time.monotonic()
        procs[addrs.index(victim)].send_signal(signal.SIGKILL)
        marked = None
        while time.monotonic() < t_kill + 5:
            if not router.endpoints.get(victim).healthy:
                marked = time.monotonic() - t_kill
                break
            time.sleep(0.002)
        load.join()
        spanning = [e - t_kill for s, e, ok in load.records if s <= t_kill <= e]
        after = sorted(e - s for s, e, ok in load.records if s > t_kill and ok)
        before = sorted(e - s for s, e, ok in load.records if e < t_kill and ok)
        return {
            "replicas": n,
            "errors": len(load.errors),
            "failovers": router.stats.failovers,
            "marked_down_after_ms": None if marked is None else marked * 1e3,
            "calls_in_flight_at_kill": len(spanning),
            "their_completion_after_kill_ms_max": 1e3 * max(spanning, default=0.0),
            "latency_ms_p50_before": 1e3 * before[len(before) // 2],
            "latency_ms_p50_after": 1e3 * after[len(after) // 2],
        }
    finally:
        router.close()
        stop(list(procs))


def new_replica(args) -> dict:
    """A `dns:///` name gains an address mid-run: how soon it gets calls."""
    addrs, procs = zip(*[spawn_standin(args.delay_ms, args.load_ms) for _ in range(2)], strict=True)
    current = list(addrs)

    def resolver(t: Target) -> list[str]:
        return list(current)

    names, weights = zipf_names(args.avatars)
    router = make_router("dns:///replicas:1", refresh_s=0.5, resolver=resolver)
    extra: list[subprocess.Popen] = []
    try:
        load = Load(router, names, weights, threads=12).run(5.0)
        time.sleep(1.5)
        address, proc = spawn_standin(args.delay_ms, args.load_ms)
        extra.append(proc)
        current.append(address)
        t_up = time.monotonic()
        first = None
        while time.monotonic() < t_up + 3.0:
            if router.stats.per_endpoint.get(address):
                first = time.monotonic() - t_up
                break
            time.sleep(0.01)
        load.join()
        return {
            "first_call_after_s": first,
            "refresh_s": 0.5,
            "its_share_of_calls_after": router.stats.per_endpoint.get(address, 0)
            / max(1, sum(router.stats.per_endpoint.values())),
        }
    finally:
        router.close()
        stop([*procs, *extra])


# -- the alternative: an L7 proxy hashing on a model-id header ----------------------------
NGINX_CONF = """worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  client_max_body_size 64m;
  upstream replicas {{
    hash $http_x_model_id consistent;
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{
      grpc_pass grpc://replicas;
      grpc_next_upstream error timeout non_idempotent;
      grpc_read_timeout 30s;
    }}
  }}
}}
"""


class ModelIdHeader(grpc.UnaryUnaryClientInterceptor):
    """Sends the request's model id as `x-model-id` (what the proxy hashes on)."""

    def intercept_unary_unary(self, continuation, details, request):
        model_id = getattr(request, "model_id", "")
        md = [*(details.metadata or []), ("x-model-id", model_id)]
        return continuation(details._replace(metadata=md), request)


def start_nginx(addrs: list[str], tmp: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    servers = "\n".join(f"    server {a} max_fails=1 fail_timeout=5s;" for a in addrs)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, servers=servers, port=port))
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    wait_healthy(address, 30, proc)  # proxied to a replica's health service
    return address, proc


def proxy_main(args) -> dict:
    """The same load through nginx (`hash $http_x_model_id consistent`) instead of the
    router: the extra hop per call, throughput, a replica's SIGKILL."""
    import shutil

    from compositing_service.inference_client import InferenceClient

    if shutil.which("nginx") is None:
        return {"skipped": "nginx is not installed"}
    out: dict = {"proxy": "nginx, hash $http_x_model_id consistent, keepalive 64"}
    feats = bytes(BLOCK_BYTES)
    with tempfile.TemporaryDirectory(prefix="scaling-nginx-") as t:
        tmp = Path(t)
        addrs, procs = zip(*[spawn_standin(0.0, 0.0) for _ in range(2)], strict=True)
        proxy, nginx = start_nginx(list(addrs), tmp)
        try:
            direct = InferenceClient(addrs[0], MAX_MSG, 10.0, "uint8")
            routed = make_router(",".join(addrs))
            proxied = InferenceClient(proxy, MAX_MSG, 10.0, "uint8", interceptors=[ModelIdHeader()])
            rounds: dict[str, list[float]] = {"direct": [], "routed": [], "nginx": []}
            for _ in range(5):
                for label, c in (("direct", direct), ("routed", routed), ("nginx", proxied)):
                    for _ in range(30):
                        c.infer(InferCall("a", 1, audio_features=feats))
                    t0 = time.perf_counter()
                    for _ in range(300):
                        c.infer(InferCall("a", 1, audio_features=feats))
                    rounds[label].append((time.perf_counter() - t0) / 300 * 1e3)
            out["call_ms_median"] = {k: statistics.median(v) for k, v in rounds.items()}
            for c in (direct, routed, proxied):
                c.close()
        finally:
            stop([nginx, *procs])
    with tempfile.TemporaryDirectory(prefix="scaling-nginx-") as t:
        tmp = Path(t)
        n = 4
        addrs, procs = zip(
            *[spawn_standin(args.delay_ms, args.load_ms) for _ in range(n)], strict=True
        )
        proxy, nginx = start_nginx(list(addrs), tmp)
        names, weights = zipf_names(args.avatars)
        client = InferenceClient(proxy, MAX_MSG, 30.0, "uint8", interceptors=[ModelIdHeader()])
        try:
            with ThreadPoolExecutor(4 * n) as pool:
                list(pool.map(lambda m: client.infer(InferCall(m, 1, audio_features=feats)), names))
            load = Load(client, names, weights, threads=4 * n, seed=100).run(args.seconds).join()
            done = [r for r in load.records if r[2]]
            lat = sorted(e - s for s, e, _ in done)
            calls = []
            for a in addrs:
                with grpc.insecure_channel(a) as ch:
                    st = ipb_grpc.InferenceServiceStub(ch).GetModelStats(
                        common.GetModelStatsRequest(), timeout=5
                    )
                calls.append(st.max_models)  # the stand-in reports its calls there
            out["throughput"] = {
                "replicas": n,
                "calls_per_s": len(done) / args.seconds,
                "latency_ms_p50": 1e3 * lat[len(lat) // 2],
                "latency_ms_p95": 1e3 * lat[int(len(lat) * 0.95)],
                "per_replica_calls_total": sorted(calls),
                "errors": len(load.errors),
            }
            load = Load(client, names, weights, threads=4 * n, seed=200).run(3.0)
            time.sleep(1.0)
            t_kill = time.monotonic()
            procs[0].send_signal(signal.SIGKILL)
            load.join()
            spanning = [e - t_kill for s, e, ok in load.records if s <= t_kill <= e]
            out["failover"] = {
                "errors": len(load.errors),
                "calls": len(load.records),
                "calls_in_flight_at_kill": len(spanning),
                "their_completion_after_kill_ms_max": 1e3 * max(spanning, default=0.0),
            }
        finally:
            client.close()
            stop([nginx, *procs])
    return out


def routing_main(args) -> dict:
    ns = [int(x) for x in args.replicas.split(",")]
    rows = [throughput(n, args) for n in ns]
    one = next((r["calls_per_s"] for r in rows if r["replicas"] == 1), None)
    for r in rows:
        if one:
            r["vs_n_x_one"] = r["calls_per_s"] / (r["replicas"] * one)
    return {
        "stand_in": f"simulated GPU: serial, {args.delay_ms} ms a call, +{args.load_ms} ms "
        "for an avatar it has not seen; uint8 mouths of 1 frame",
        "avatars": args.avatars,
        "seconds": args.seconds,
        "warm_seconds": args.warm_seconds,
        "throughput": rows,
        "overhead": overhead(args),
        "failover": failover(args),
        "new_replica": new_replica(args),
        "nginx": proxy_main(args),
    }


# -- 1,000 avatars -------------------------------------------------------------------------
def build_avatars(root: Path, count: int, template_avatar: Path) -> float:
    """`count` avatars: the frames and crop rects of `template_avatar` and tiny test
    networks, all hard links to one copy; only each manifest (its name) differs."""
    from lipsync.avatars.package import AUDIO_ENCODER_FILE, UNET_FILE, write_manifest
    from tests.onnx_models import build_test_encoder, build_test_unet

    t0 = time.perf_counter()
    first = root / "avatar0000"
    (first / "frames").mkdir(parents=True)
    for f in (template_avatar / "frames").iterdir():
        os.link(f, first / "frames" / f.name)
    os.link(template_avatar / "crop_rects.json", first / "crop_rects.json")
    build_test_unet(first / UNET_FILE, 1)
    build_test_encoder(first / AUDIO_ENCODER_FILE, 2)
    write_manifest(first, first.name)
    files = [p for p in first.rglob("*") if p.is_file() and p.name != "avatar.yaml"]
    for i in range(1, count):
        folder = root / f"avatar{i:04d}"
        for f in files:
            dst = folder / f.relative_to(first)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst)
        write_manifest(folder, folder.name)
    return time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def avatars_main(args) -> dict:
    from compositing_service.frames import FrameStore, decode_image
    from lipsync.avatars.package import AvatarCatalog
    from lipsync.local.launch import ServiceProcesses
    from lipsync.proto import compositing_pb2 as cpb
    from lipsync.proto import compositing_pb2_grpc as cpb_grpc
    from tests.avatar_factory import speech_like

    out: dict = {"count": args.count, "template": args.template}
    with tempfile.TemporaryDirectory(prefix="scaling-avatars-") as tmp:
        root = Path(tmp)
        out["build_s"] = build_avatars(root, args.count, Path(args.template))
        one = sorted((root / "avatar0000" / "frames").iterdir())
        out["frames_per_avatar"] = len(one)
        out["frame_file_bytes_per_avatar"] = sum(p.stat().st_size for p in one)
        out["decoded_bytes_per_avatar"] = sum(decode_image(p.read_bytes()).nbytes for p in one)
        catalog = AvatarCatalog(root)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            catalog.rescan()
            times.append(time.perf_counter() - t)
        out["catalog_rescan_ms"] = 1e3 * min(times)
        # The frames store in this process: every avatar held, as file bytes.
        store = FrameStore(catalog, args.count, 64 << 30, 256 << 20)
        rss0 = rss_mb(os.getpid())
        t = time.perf_counter()
        store.preload_ids(["*"])
        out["frame_store_load_all_s"] = time.perf_counter() - t
        out["frame_store_bytes_per_avatar"] = store.loaded_bytes() / args.count
        out["frame_store_rss_mb_per_avatar"] = (rss_mb(os.getpid()) - rss0) / args.count
        first = []
        for name in random.Random(0).sample(catalog.names(), 100):
            store.unload(name)
            t = time.perf_counter()
            store.get(name).frames[3]
            first.append(1e3 * (time.perf_counter() - t))
        out["frame_store_cold_first_frame_ms_p50"] = statistics.median(first)
        out["frame_store_cold_first_frame_ms_p95"] = pct(first, 0.95)
        del store

        # Both services as processes: two inference replicas routed by avatar.
        base = free_port()
        env = dict(os.environ)
        env.update(
            {
                "AVATARS_DIR": str(root),
                "LIPSYNC_INFERENCE__EXECUTION_PROVIDERS": "cpu",
                "LIPSYNC_INFERENCE__INTRA_OP_THREADS": "1",
                "LIPSYNC_INFERENCE__METRICS_PORT": "0",
                "LIPSYNC_INFERENCE__REGISTRY__MAX_MODELS": str(args.models_per_replica),
                "LIPSYNC_COMPOSITING__METRICS_PORT": "0",
                "LIPSYNC_COMPOSITING__WORKERS": "2",
                "LIPSYNC_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(REPO),
            }
        )
        svc = ServiceProcesses(
            env=env,
            inference_port=base if base < 60000 else 41000,
            compositing_port=free_port(),
            quiet=True,
            inference_replicas=2,
        )
        t = time.perf_counter()
        with svc:
            out["services_ready_s"] = time.perf_counter() - t
            channel = grpc.insecure_channel(svc.address)
            stub = cpb_grpc.CompositingServiceStub(channel)
            # the compositing service reads every avatar's files at start (preload "*")
            t_pre = time.monotonic()
            while time.monotonic() < t_pre + 120:
                listed = stub.ListModels(common.ListModelsRequest(), timeout=30).models
                if sum(m.frames_cached for m in listed) >= args.count:
                    break
                time.sleep(0.5)
            out["compositing_preload_all_s"] = time.perf_counter() - t
            t = time.perf_counter()
            listed = stub.ListModels(common.ListModelsRequest(), timeout=30).models
            out["list_models_ms"] = 1e3 * (time.perf_counter() - t)
            out["list_models_count"] = len(listed)
            comp_pid = svc.procs[-1].pid
            inf_pids = [p.pid for p in svc.procs[:-1]]
            out["rss_mb_after_start"] = {
                "compositing": rss_mb(comp_pid),
                "inference": [rss_mb(p) for p in inf_pids],
            }
            clip = speech_like(0.6, seed=1).tobytes()
            names = [m.model_id for m in listed]
            rng = random.Random(1)

            def frame(name: str) -> float:
                t = time.perf_counter()
                resp = stub.InferBatchComposite(
                    cpb.CompositeBatchRequest(model_id=name, raw_audio=clip, batch_size=1),
                    timeout=60,
                )
                assert resp.success, resp.error
                return 1e3 * (time.perf_counter() - t)

            cold = [frame(n) for n in rng.sample(names, args.cold)]
            warm_names = names[: args.models_per_replica]
            for n in warm_names:
                frame(n)
            warm = [frame(rng.choice(warm_names)) for _ in range(args.cold)]
            out["first_frame_ms"] = {
                "cold_p50": statistics.median(cold),
                "cold_p95": pct(cold, 0.95),
                "warm_p50": statistics.median(warm),
                "warm_p95": pct(warm, 0.95),
            }
            churn, t_end = [], time.monotonic() + args.churn_s
            while time.monotonic() < t_end and len(churn) < 2000:
                churn.append(frame(rng.choice(names)))
            out["churn"] = {
                "requests": len(churn),
                "over_avatars": len(names),
                "models_per_replica": args.models_per_replica,
                "p50_ms": statistics.median(churn),
                "p95_ms": pct(churn, 0.95),
                "rss_mb_after": {
                    "compositing": rss_mb(comp_pid),
                    "inference": [rss_mb(p) for p in inf_pids],
                },
            }
            channel.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.scaling", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("standin")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--delay-ms", type=float, default=25.0)
    s.add_argument("--load-ms", type=float, default=50.0)
    r = sub.add_parser("routing")
    r.add_argument("--replicas", default="1,2,4,8")
    r.add_argument("--delay-ms", type=float, default=25.0)
    r.add_argument("--load-ms", type=float, default=50.0)
    r.add_argument("--seconds", type=float, default=4.0)
    r.add_argument("--warm-seconds", type=float, default=1.0)
    r.add_argument("--avatars", type=int, default=200)
    px = sub.add_parser("proxy")
    px.add_argument("--delay-ms", type=float, default=25.0)
    px.add_argument("--load-ms", type=float, default=50.0)
    px.add_argument("--seconds", type=float, default=4.0)
    px.add_argument("--avatars", type=int, default=200)
    a = sub.add_parser("avatars")
    a.add_argument("--count", type=int, default=1000)
    a.add_argument("--template", default=str(REPO / "avatars" / "demo"))
    a.add_argument("--models-per-replica", type=int, default=16)
    a.add_argument("--cold", type=int, default=60)
    a.add_argument("--churn-s", type=float, default=15.0)
    args = ap.parse_args(argv)
    if args.cmd == "standin":
        standin_main(args.port, args.delay_ms, args.load_ms)
        return 0
    run = {"routing": routing_main, "proxy": proxy_main, "avatars": avatars_main}[args.cmd]
    result = run(args)
    result["machine"] = f"{os.cpu_count()} cores, {sys.platform}, Python {sys.version.split()[0]}"
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
