"""What an operator runs on (docs/OPERATIONS.md): both /metrics endpoints scraped around
known traffic, the dashboard and alert rules against the names the services export,
server reflection, per-model health, JSON logs, traces across both services, and
Debian's Prometheus scraping the services (skipped where it is not installed)."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from lipsync.config import load_config
from lipsync.local.launch import stop_processes
from lipsync.local.ports import free_port
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from tests.avatar_factory import speech_like
from tests.conftest import service_config, start_services, stop_services

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "lipsync.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"


# --- helpers --------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """Every sample of http://127.0.0.1:port/metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for k, v in samples.items() if k.split("{", 1)[0] == name and all(w in k for w in want)
    )


def exported_names(*ports: int) -> set[str]:
    """Sample names (foo_total, foo_bucket, ...) and family names of the endpoints."""
    names: set[str] = set()
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(text.decode()):
            names.add(family.name)
            names.update(s.name for s in family.samples)
    return names


METRIC_RE = re.compile(r"\b((?:lipsync|process|python)_[a-z0-9_]+)\b")


def names_used(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


# --- services with metrics and tracing on ---------------------------------------------


def _otel():
    """The in-memory exporter's pieces, or None without the `tracing` extra."""
    try:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return None
    return SimpleSpanProcessor, InMemorySpanExporter


@pytest.fixture(scope="module")
def ops(avatars_root, shared_encoder):
    """Both services in-process with metrics ports and, where the `tracing` extra is
    installed, tracing on into an in-memory exporter."""
    cfg = service_config(avatars_root, shared_encoder)
    cfg.inference.metrics_port = free_port()
    cfg.compositing.metrics_port = free_port()
    otel = _otel()
    cfg.tracing.enabled = otel is not None  # no otlp_endpoint: spans go only to the exporter
    s = start_services(cfg)
    s.spans = None
    if otel is not None:
        processor, exporter = otel
        s.spans = exporter()
        for svc in (s.inference, s.compositing):
            svc.observability.tracing.provider.add_span_processor(processor(s.spans))
    channel = grpc.insecure_channel(s.address)
    s.stub = cpb_grpc.CompositingServiceStub(channel)
    s.channel = channel
    yield s
    channel.close()
    stop_services(s)


@pytest.fixture(scope="module")
def clip():
    return speech_like(1.2, seed=11)


def batch(ops, clip, n: int, model: str = "alice", metadata=()) -> cpb.CompositeBatchResponse:
    resp = ops.stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id=model, batch_size=n, raw_audio=clip.astype("<f4").tobytes()
        ),
        metadata=metadata,
        timeout=60,
    )
    assert resp.success, resp.error
    return resp


def test_frames_counter_grows_by_exactly_the_frames_delivered(ops, clip):
    c0, i0 = scrape(ops.compositing.metrics_port), scrape(ops.inference.metrics_port)
    batch(ops, clip, 5)
    batch(ops, clip, 3, model="bob")
    c1, i1 = scrape(ops.compositing.metrics_port), scrape(ops.inference.metrics_port)
    assert total(c1, "lipsync_frames_total") - total(c0, "lipsync_frames_total") == 8
    assert (
        total(c1, "lipsync_frames_total", model_id="alice")
        - total(c0, "lipsync_frames_total", model_id="alice")
        == 5
    )
    rpc = {"service": "compositing", "rpc": "InferBatchComposite", "code": "OK"}
    assert (
        total(c1, "lipsync_requests_total", **rpc) - total(c0, "lipsync_requests_total", **rpc) == 2
    )
    # the stage histograms of both services grow
    for stage in ("crop", "inference", "transfer", "paste_jpeg", "background_cache"):
        key = {"service": "compositing", "stage": stage}
        assert (
            total(c1, "lipsync_stage_seconds_count", **key)
            - total(c0, "lipsync_stage_seconds_count", **key)
            == 2
        ), stage
    for stage in ("decode", "mel", "audio_encoder", "unet", "encode", "queue_wait"):
        key = {"service": "inference", "stage": stage}
        assert total(i1, "lipsync_stage_seconds_count", **key) > total(
            i0, "lipsync_stage_seconds_count", **key
        ), stage
    assert total(i1, "lipsync_batch_size_count") > total(i0, "lipsync_batch_size_count")
    assert (
        total(i1, "lipsync_inferred_frames_total") - total(i0, "lipsync_inferred_frames_total") == 8
    )
    assert total(i1, "lipsync_models_loaded") >= 1
    assert total(c1, "lipsync_background_cache_bytes") > 0
    assert total(c1, "process_resident_memory_bytes") > 0  # the library's collectors


def test_failed_batch_is_counted_under_its_code(ops, clip):
    before = scrape(ops.compositing.metrics_port)
    resp = ops.stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id="nobody", batch_size=2, raw_audio=clip.astype("<f4").tobytes()
        )
    )
    assert not resp.success
    after = scrape(ops.compositing.metrics_port)
    key = {"rpc": "InferBatchComposite", "code": "NOT_FOUND"}
    assert (
        total(after, "lipsync_requests_total", **key)
        - total(before, "lipsync_requests_total", **key)
        == 1
    )
    assert total(after, "lipsync_frames_total") == total(before, "lipsync_frames_total")


def test_stream_frames_and_active_streams_gauge(ops, clip):
    port = ops.compositing.metrics_port
    requests: queue.Queue = queue.Queue()

    def feed():
        while (item := requests.get()) is not None:
            yield item

    requests.put(cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", realtime=False)))
    before = scrape(port)
    responses = ops.stub.StreamComposite(feed(), timeout=60)
    deadline = time.monotonic() + 10
    while total(scrape(port), "lipsync_active_streams", mode="offline") < 1:
        assert time.monotonic() < deadline, "the gauge never showed the open stream"
        time.sleep(0.05)
    requests.put(cpb.StreamRequest(audio=clip.astype("<f4").tobytes()))
    requests.put(cpb.StreamRequest(end_of_audio=True))
    frames = []
    for f in responses:
        frames.append(f)
        if len(frames) == 1:
            requests.put(None)  # half-close: the stream ends after the clip's frames
    assert frames
    deadline = time.monotonic() + 10
    while total(scrape(port), "lipsync_active_streams", mode="offline") != 0:
        assert time.monotonic() < deadline, "the gauge never went back to 0"
        time.sleep(0.05)
    after = scrape(port)
    key = {"rpc": "StreamComposite"}
    assert total(after, "lipsync_frames_total", **key) - total(
        before, "lipsync_frames_total", **key
    ) == len(frames)


def test_reflection_lists_the_services(ops):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def services(address):
        with grpc.insecure_channel(address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
            return {s.name for s in resp.list_services_response.service}

    assert "compositing.CompositingService" in services(ops.address)
    assert "grpc.health.v1.Health" in services(ops.address)
    assert "lipsync.inference.InferenceService" in services(ops.inference_address)


def test_health_per_model_and_health_rpc(ops):
    def status(address, name):
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            try:
                return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            except grpc.RpcError as exc:
                return exc.code()

    serving = health_pb2.HealthCheckResponse.SERVING
    assert status(ops.inference_address, "lipsync.inference.InferenceService") == serving
    assert status(ops.address, "compositing.CompositingService") == serving
    ops.stub.LoadModel(cpb.LoadModelRequest(model_id="bob"), timeout=30)
    assert status(ops.inference_address, "model/bob") == serving
    assert status(ops.address, "model/bob") == serving  # its frames are decoded here
    assert status(ops.inference_address, "model/nobody") == grpc.StatusCode.NOT_FOUND
    ops.stub.UnloadModel(cpb.UnloadModelRequest(model_id="bob"), timeout=30)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert status(ops.inference_address, "model/bob") == not_serving
    assert status(ops.address, "model/bob") == not_serving
    h = ops.stub.Health(cpb.HealthRequest(), timeout=10)
    assert h.healthy and h.inference_server_healthy
    assert h.max_models == ops.cfg.inference.registry.max_models
    assert h.loaded_models == len(ops.inference.servicer.engine.registry.loaded_ids())


def test_model_stats_memory_is_the_measured_growth(ops):
    ops.stub.LoadModel(cpb.LoadModelRequest(model_id="alice"), timeout=30)
    stats = ops.stub.GetModelStats(cpb.GetModelStatsRequest(model_id="alice"), timeout=10)
    entry = ops.inference.servicer.engine.registry.entries()["alice"]
    assert stats.stats[0].memory_bytes == entry.value.memory_bytes >= 0


def test_a_trace_spans_both_services_and_the_batch(ops, clip):
    if ops.spans is None:
        pytest.skip("the `tracing` extra (opentelemetry-sdk) is not installed")
    ops.spans.clear()
    batch(ops, clip, 2, metadata=(("x-request-id", "trace-test-1"),))
    spans = ops.spans.get_finished_spans()
    comp = [s for s in spans if s.name == "InferBatchComposite"]
    assert len(comp) == 1
    trace_id = comp[0].context.trace_id
    infer = [s for s in spans if s.name == "Infer" and s.context.trace_id == trace_id]
    assert infer and all(s.parent.span_id == comp[0].context.span_id for s in infer)
    runs = [s for s in spans if s.name == "unet batch" and s.context.trace_id == trace_id]
    assert runs and runs[0].parent.span_id in {s.context.span_id for s in infer}
    assert comp[0].attributes["model_id"] == "alice"
    assert comp[0].resource.attributes["service.name"] == "lipsync-compositing"
    assert infer[0].resource.attributes["service.name"] == "lipsync-inference"


def test_a_stream_trace_holds_its_inference_calls(ops, clip):
    """The session's threads run in the RPC's context: the stream's Infer calls are
    children of its server span."""
    if ops.spans is None:
        pytest.skip("the `tracing` extra (opentelemetry-sdk) is not installed")
    ops.spans.clear()
    reqs = [
        cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", realtime=True)),
        cpb.StreamRequest(audio=clip.astype("<f4").tobytes()),
        cpb.StreamRequest(end_of_audio=True),
    ]
    frames = list(
        ops.stub.StreamComposite(
            iter(reqs), metadata=(("x-request-id", "stream-trace-1"),), timeout=60
        )
    )
    assert any(f.generated for f in frames)
    deadline = time.monotonic() + 10
    while True:
        stream = [s for s in ops.spans.get_finished_spans() if s.name == "StreamComposite"]
        if stream:
            break
        assert time.monotonic() < deadline, "the stream's span never ended"
        time.sleep(0.05)
    assert len(stream) == 1
    trace_id = stream[0].context.trace_id
    spans = ops.spans.get_finished_spans()
    infer = [s for s in spans if s.name == "Infer" and s.context.trace_id == trace_id]
    assert infer and all(s.parent.span_id == stream[0].context.span_id for s in infer)


def test_metrics_port_is_released_on_stop(avatars_root, shared_encoder):
    from inference_service.server import start

    cfg = service_config(avatars_root, shared_encoder)
    cfg.inference.metrics_port = port = free_port()
    for _ in range(2):  # the second start binds the same port: the first released it
        svc = start(cfg, port=0, preload=False)
        assert svc.metrics_port == port
        assert "lipsync_build_info" in exported_names(port)
        svc.stop(0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_port_zero_is_off(avatars_root, shared_encoder):
    from inference_service.server import start

    cfg = service_config(avatars_root, shared_encoder)  # metrics_port 0
    svc = start(cfg, port=0, preload=False)
    try:
        assert svc.metrics_port == 0
    finally:
        svc.stop(0)


# --- dashboards and alerts against what the services export ----------------------------


def test_dashboard_and_alerts_use_only_exported_names(ops, clip):
    batch(ops, clip, 2)
    exported = exported_names(ops.compositing.metrics_port, ops.inference.metrics_port)
    # series that exist only on some machines or that a scrape shows only once they moved
    optional = {
        "lipsync_gpu_memory_used_bytes",
        "lipsync_gpu_memory_total_bytes",
        "lipsync_gpu_utilization_ratio",
    }
    used: dict[str, set[str]] = {}
    for expr in dashboard_exprs():
        for name in names_used(expr):
            used.setdefault(name, set()).add("dashboard")
    for rule in alert_rules():
        for name in names_used(rule["expr"]):
            used.setdefault(name, set()).add(rule["alert"])
    assert used, "no metric names found in the dashboard or the rules"
    missing = {n: w for n, w in used.items() if n not in exported and n not in optional}
    assert not missing, f"not exported by the services: {missing}"
    for must in ("lipsync_frames_total", "lipsync_queue_depth", "lipsync_stage_seconds_bucket"):
        assert must in used, must


def test_alert_rules_are_well_formed():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "LipsyncHighErrorRate",
        "LipsyncShedding",
        "LipsyncQueueBacklog",
        "LipsyncSlowBatches",
        "LipsyncModelChurn",
        "LipsyncServiceDown",
    }
    for r in rules:
        assert r["expr"].strip() and r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["runbook"].startswith(
            "docs/OPERATIONS.md#"
        )
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert f"{anchor}" in _anchors(), f"{r['alert']}: no section {anchor}"
    promtool = shutil.which("promtool")
    if promtool:
        proc = subprocess.run(
            [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _anchors() -> set[str]:
    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    return {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, re.M)
    }


def test_dashboard_is_grafana_json():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 30
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("frames", "latency", "queue", "error", "shed", "model", "late", "stage"):
        assert topic in titles, topic
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_config_scrapes_both_metrics_ports():
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t
        for job in cfg["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    defaults = load_config(env={})
    assert f"inference:{defaults.inference.metrics_port}" in targets
    assert f"compositing:{defaults.compositing.metrics_port}" in targets
    assert cfg["rule_files"]


# --- the services as processes: JSON logs, Debian's Prometheus -------------------------


@pytest.fixture(scope="module")
def processes(avatars_root, shared_encoder, tmp_path_factory):
    """Both services as `python -m` processes with log_format json and metrics ports."""
    tmp = tmp_path_factory.mktemp("ops-procs")
    ports = {k: free_port() for k in ("inf", "comp", "inf_m", "comp_m")}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "AVATARS_DIR": str(avatars_root),
        "INFERENCE_ADDRESS": f"127.0.0.1:{ports['inf']}",
        "LIPSYNC_LOG_FORMAT": "json",
        "LIPSYNC_ACCESS_LOG": "info",
        "LIPSYNC_INFERENCE__SHARED_AUDIO_ENCODER": str(shared_encoder),
        "LIPSYNC_INFERENCE__EXECUTION_PROVIDERS": "cpu",
        "LIPSYNC_INFERENCE__HOST": "127.0.0.1",
        "LIPSYNC_COMPOSITING__HOST": "127.0.0.1",
        "LIPSYNC_INFERENCE__METRICS_PORT": str(ports["inf_m"]),
        "LIPSYNC_COMPOSITING__METRICS_PORT": str(ports["comp_m"]),
    }
    procs, logs = [], {}
    for name, module, port in (
        ("inference", "inference_service", ports["inf"]),
        ("compositing", "compositing_service", ports["comp"]),
    ):
        logs[name] = tmp / f"{name}.log"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=logs[name].open("w"),
                cwd=REPO,
            )
        )
    from lipsync.rpc.channel import wait_healthy

    try:
        wait_healthy(f"127.0.0.1:{ports['inf']}", 120, procs[0])
        wait_healthy(f"127.0.0.1:{ports['comp']}", 120, procs[1])
    except BaseException:
        for p in procs:
            p.kill()
        raise
    yield {"ports": ports, "logs": logs, "procs": procs}
    stop_processes(procs, 15)


def _batch_to(address: str, clip, n: int) -> None:
    with grpc.insecure_channel(address) as ch:
        resp = cpb_grpc.CompositingServiceStub(ch).InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id="alice", batch_size=n, raw_audio=clip.astype("<f4").tobytes()
            ),
            metadata=(("x-request-id", "json-log-test"),),
            timeout=60,
        )
    assert resp.success, resp.error


def test_json_logs_every_line_parses(processes, clip):
    _batch_to(f"127.0.0.1:{processes['ports']['comp']}", clip, 3)

    def access_logged(path) -> bool:  # both services log the call's access line after it
        return any(
            '"json-log-test"' in ln and '"lipsync.access"' in ln
            for ln in path.read_text().splitlines()
        )

    end = time.monotonic() + 30
    while not all(access_logged(p) for p in processes["logs"].values()):
        assert time.monotonic() < end, "the access lines were not logged"
        time.sleep(0.05)
    for name, path in processes["logs"].items():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        assert lines, f"{name} logged nothing"
        records = []
        for ln in lines:
            try:
                records.append(json.loads(ln))
            except json.JSONDecodeError:
                pytest.fail(f"{name}: not JSON: {ln!r}")
        for r in records:
            assert {"time", "level", "service", "event"} <= set(r), r
        access = [  # the access lines (other lines logged inside a call carry its ids too)
            r
            for r in records
            if r.get("logger") == "lipsync.access"
            and r.get("rpc") in ("InferBatchComposite", "Infer")
        ]
        if name == "compositing":
            (line,) = [r for r in access if r["rpc"] == "InferBatchComposite"]
            assert line["request_id"] == "json-log-test" and line["model_id"] == "alice"
            assert line["code"] == "OK" and line["duration_ms"] > 0 and line["frames"] == 3
        else:  # the request id travelled with the inference call
            assert any(r.get("request_id") == "json-log-test" for r in access), access
        # never audio or payloads: no line is long
        assert max(len(ln) for ln in lines) < 4000


def test_prometheus_scrapes_the_services_and_answers_frames_per_second(processes, clip, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus)")
    ports = processes["ports"]
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "lipsync",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{ports['inf_m']}", f"127.0.0.1:{ports['comp_m']}"]}
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )

    def query(q: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    try:
        deadline = time.monotonic() + 60
        while True:  # both targets up
            try:
                up = query("up")
                if len(up) == 2 and all(r["value"][1] == "1" for r in up):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                _batch_to(f"127.0.0.1:{ports['comp']}", clip, 2)

        t = threading.Thread(target=traffic)
        t.start()
        try:
            deadline = time.monotonic() + 60
            while True:
                result = query("sum(rate(lipsync_frames_total[1m]))")
                if result and float(result[0]["value"][1]) > 0:
                    break
                assert time.monotonic() < deadline, "rate(lipsync_frames_total[1m]) stayed 0"
                time.sleep(1)
        finally:
            stop.set()
            t.join()
        fps = float(result[0]["value"][1])
        print(f"PromQL sum(rate(lipsync_frames_total[1m])) = {fps:.2f} frames/s")
        # the rules loaded and evaluate
        rules = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).read()
        )
        loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert {r["alert"] for r in alert_rules()} <= loaded
    finally:
        proc.terminate()
        proc.wait(15)


# --- the gateway's /metrics -----------------------------------------------------------


def test_gateway_serves_metrics():
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from lipsync.web.app import create_app

    async def main() -> str:
        async with TestClient(TestServer(create_app("127.0.0.1:1"))) as client:
            assert (await client.get("/healthz")).status == 200
            resp = await client.get("/metrics")
            assert resp.status == 200
            return await resp.text()

    text = asyncio.run(main())
    assert 'lipsync_gateway_requests_total{route="/healthz",status="200"} 1.0' in text
    assert "lipsync_gateway_sessions 0.0" in text
    assert "process_resident_memory_bytes" in text


# --- Kubernetes: the monitoring component ---------------------------------------------

K8S_MONITORING = ("gpu", "cpu")


def _render_monitoring(overlay: str) -> str:
    from tests.docker.manifests import kubectl_problem

    problem = kubectl_problem()
    if problem:
        pytest.skip(problem)
    proc = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / "monitoring" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("overlay", K8S_MONITORING)
def test_k8s_monitoring_overlay_validates(overlay, tmp_path):
    """The built-in kinds pass `kubernetes-validate --strict` like the deployment's
    overlays (tests/test_deploy_files.py); ServiceMonitor is a CRD without a schema
    there, so it is checked structurally: its selector matches a Service that has the
    port it scrapes, and that port is the service's metrics_port."""
    from tests.test_deploy_files import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(_render_monitoring(overlay)) if d]
    crds = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    core = [d for d in docs if d not in crds]
    exe = kubernetes_validate()
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    for version in ("1.30", "1.37"):
        out = subprocess.run(
            [exe, "--strict", "--quiet", "-k", version, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    defaults = load_config(env={})
    want_port = {
        "lipsync-inference": defaults.inference.metrics_port,
        "lipsync-compositing": defaults.compositing.metrics_port,
    }
    services = {d["metadata"]["name"]: d for d in core if d["kind"] == "Service"}
    deployments = {d["metadata"]["name"]: d for d in core if d["kind"] == "Deployment"}
    monitors = {d["metadata"]["name"]: d for d in crds if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {*want_port, "lipsync-web"}
    for name, mon in monitors.items():
        if name == "lipsync-web":  # the gateway: /metrics on its http port
            (endpoint,) = mon["spec"]["endpoints"]
            svc = services[name]
            assert (
                mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            )
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
            continue
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        selector = mon["spec"]["selector"]["matchLabels"]
        (svc,) = [
            s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()
        ]
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        for endpoint in mon["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert ports[endpoint["port"]]["port"] == want_port[name]
        # the pods have the port the Service targets, and the scrape annotations
        pod = deployments[name]["spec"]["template"]
        container_ports = {
            p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]
        }
        assert container_ports["metrics"] == want_port[name]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(want_port[name])
    (hpa,) = [d for d in core if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    assert "replicas" not in deployments[hpa["spec"]["scaleTargetRef"]["name"]]["spec"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(
        (REPO / "k8s" / "monitoring" / "prometheus-adapter-values.yaml").read_text()
    )
    served = {r["name"]["as"]: r["seriesQuery"] for r in adapter["rules"]["custom"]}
    assert metric in served
    assert "lipsync_frames_total" in served[metric]


def test_tracing_and_gpu_packages_are_imported_only_when_used():
    code = (
        "import sys, compositing_service.server, inference_service.server, lipsync.client;"
        "bad = sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'pynvml')));"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_json_formatter_one_object_per_line_with_ids():
    import io
    import logging

    from lipsync.serving.logs import JsonFormatter, call_ids

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("svc"))
    logger = logging.getLogger("tests.ops.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with call_ids(request_id="r1", model_id="m1"):
            logger.info("two\nlines %s", "x")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(ln) for ln in lines)
    assert first["event"] == "two\nlines x" and first["request_id"] == "r1"
    assert first["model_id"] == "m1" and first["service"] == "svc" and first["level"] == "INFO"
    assert "request_id" not in second and "ValueError: boom" in second["exc"]


# --- Docker Compose: the monitoring file ----------------------------------------------


def test_compose_monitoring_file():
    """Prometheus and Grafana only, published on localhost by default, mounting files
    that exist; the scrape targets are compose service names of docker-compose.yml."""
    doc = yaml.safe_load((REPO / "deploy" / "compose.monitoring.yml").read_text())
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert set(doc["services"]) == {"prometheus", "grafana"}
    for name, svc in doc["services"].items():
        for port in svc["ports"]:
            assert port.startswith("${MONITORING_PUBLISH_IP:-127.0.0.1}:"), (name, port)
        for volume in svc["volumes"]:
            src = volume.split(":", 1)[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), (name, src)
        assert ":" in svc["image"] and not svc["image"].endswith(":latest")
    assert set(doc["services"]["prometheus"]["depends_on"]) <= set(base)
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    hosts = {
        t.split(":")[0]
        for job in prom["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    assert hosts <= set(base)
    if shutil.which("docker-compose"):
        env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test"}
        out = subprocess.run(
            [
                "docker-compose",
                "-f",
                "docker-compose.yml",
                "-f",
                "deploy/compose.monitoring.yml",
                "config",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        merged = yaml.safe_load(out.stdout)["services"]
        assert {"inference", "compositing", "web", "prometheus", "grafana"} <= set(merged)


def test_realtime_late_and_skipped_frames_are_counted_by_the_pacer():
    """The realtime pacer counts where it paces (its events feed the service's counters
    through compositing_service.service_metrics.pace_events); the interceptor infers nothing from
    the frames it sees (it counts them, no more)."""
    from compositing_service.service_metrics import CompositingMetrics, pace_events
    from compositing_service.streaming.output import FrameMessages, RealtimePacer
    from compositing_service.streaming.schedule import Schedule
    from lipsync.serving import observability as observe

    m = CompositingMetrics()
    now = [10.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    pacer = RealtimePacer(
        FrameMessages(25, 3, 0, lambda i: b"idle", False, lambda: now[0]),
        Schedule(25),
        clock=lambda: now[0],
        sleep=sleep,
        on_event=pace_events(m),
    )
    frames = pacer.frames()
    sent = [next(frames)]  # slot 0 at 10.00, on time
    now[0] = 10.15  # slot 1 (due 10.04) is skipped; slot 2 (due 10.08) is sent 70 ms late
    sent.append(next(frames))
    sent.append(next(frames))  # slot 3 (due 10.12): 30 ms, not late
    assert [f.index for f in sent] == [0, 2, 3]
    skipped, late = "lipsync_realtime_frames_skipped_total", "lipsync_realtime_frames_late_total"
    assert m.registry.get_sample_value(skipped) == 1
    assert m.registry.get_sample_value(late) == 1

    call = observe._Call(
        observe.ServerObserver(m, "off"), "/compositing.CompositingService/StreamComposite", {}
    )
    call.begin()
    call.request(cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", realtime=True)))
    # a gap of five slots in the indices: still only frames
    for frame in (*sent, cpb.StreamFrame(index=9, jpeg=b"x", pts_ms=360.0)):
        call.response(frame)
    call.finish(grpc.StatusCode.OK)
    assert m.registry.get_sample_value(skipped) == 1
    assert m.registry.get_sample_value(late) == 1
    key = {"model_id": "alice", "rpc": "StreamComposite"}
    assert m.registry.get_sample_value("lipsync_frames_total", key) == 4


def test_gateway_logs_json_and_serves_metrics_as_a_process():
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "lipsync.web", "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "gateway did not start"
                time.sleep(0.2)
        assert b"lipsync_gateway_sessions" in body
    finally:
        proc.terminate()
        err = proc.communicate(timeout=15)[1]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines
    for ln in lines:
        assert json.loads(ln)["service"] == "web"


def test_config_warnings_are_logged_in_the_configured_format(tmp_path):
    """A warning the config loader logs before logging is set up still comes out as JSON."""
    code = (
        "import sys; from lipsync.serving import grpc_server as serve;"
        "serve.wait_for_termination = lambda *a, **k: None;"
        "sys.exit(serve.run_service('probe', None, lambda c: c.inference,"
        " lambda c: None, []))"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_LOG_FORMAT": "json",
        "LIPSYNC_INFERENCE__NO_SUCH_FIELD": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    (line,) = [json.loads(ln) for ln in out.stderr.splitlines() if ln.strip()]
    assert line["level"] == "WARNING" and "LIPSYNC_INFERENCE__NO_SUCH_FIELD" in line["event"]
    assert line["service"] == "probe"
