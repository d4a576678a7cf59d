"""Who may call (docs/SECURITY.md): TLS on the client port, mutual TLS between the
services, API keys with scopes and limits, the gateway's Origin check. Real TLS over real
sockets, with certificates made here (lipsync.local.devcerts, the `cryptography` package)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lipsync.cli import admin as admin_cli
from lipsync.client import LipsyncClient, LipsyncError
from lipsync.local.devcerts import LOOPBACK, Issued, issue, make_ca
from lipsync.local.ports import free_port
from lipsync.proto import common_pb2 as common
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.rpc.tls import TLSConfigError, channel_credentials, server_credentials
from lipsync.serving import api_keys as auth
from lipsync.web.app import create_app
from lipsync.web.origin_checks import origin_allowed
from tests.avatar_factory import speech_like
from tests.conftest import Services, service_config, stop_services

KEYS = {  # name -> (key, scopes, max_streams, max_frames_per_second)
    "app": ("lsk_test_client_key_0123456789abcdef", ["client"], 0, 0),
    "ops": ("lsk_test_admin_key_0123456789abcdef", ["admin"], 0, 0),
    "one-stream": ("lsk_test_one_stream_0123456789abcd", ["client"], 1, 0),
    "slow": ("lsk_test_slow_key_0123456789abcdefgh", ["client"], 0, 1),
    "refund": ("lsk_test_refund_key_0123456789abcdef", ["client"], 0, 5),
    "paced": ("lsk_test_paced_key_0123456789abcdefg", ["client"], 0, 20),
}
ALL_KEYS = [k for k, *_ in KEYS.values()]


def key(name: str) -> str:
    return KEYS[name][0]


def write_keys(path: Path, names: list[str]) -> None:
    entries = [
        {
            "name": n,
            "key_sha256": auth.hash_key(KEYS[n][0]),
            "scopes": KEYS[n][1],
            "max_streams": KEYS[n][2],
            "max_frames_per_second": KEYS[n][3],
        }
        for n in names
    ]
    path.write_text(yaml.safe_dump(entries))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, the services' certificates (SANs localhost, 127.0.0.1), the compositing
    service's client certificate, and a second CA with a certificate of its own."""
    out = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("test CA"), make_ca("another CA")
    files: dict[str, Path] = {}
    files["ca"], _ = ca.write(out, "ca")
    files["other_ca"], _ = other.write(out, "other-ca")
    for stem, who, is_server in (
        ("inference", ca, True),
        ("compositing", ca, True),
        ("compositing-client", ca, False),
        ("impostor-client", other, False),
        ("other-compositing", other, True),
    ):
        cert = issue(who, stem, ["localhost"], LOOPBACK, server=is_server, client=not is_server)
        files[stem], files[stem + "-key"] = cert.write(out, stem)
    return files


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    write_keys(path, list(KEYS))
    return path


@pytest.fixture(scope="module")
def secured(avatars_root, shared_encoder, pki, keys_file):
    """Both services: mutual TLS between them, TLS + API keys on the client port."""
    from compositing_service.server import start as start_compositing
    from inference_service.server import start as start_inference

    cfg = service_config(avatars_root, shared_encoder)
    cfg.inference.registry.preload = []
    t = cfg.inference.tls
    t.cert_file, t.key_file = str(pki["inference"]), str(pki["inference-key"])
    t.client_ca_file = str(pki["ca"])
    c = cfg.compositing.tls
    c.cert_file, c.key_file = str(pki["compositing"]), str(pki["compositing-key"])
    it = cfg.compositing.inference_tls
    it.ca_file = str(pki["ca"])
    it.cert_file, it.key_file = str(pki["compositing-client"]), str(pki["compositing-client-key"])
    cfg.auth.api_keys_file = str(keys_file)
    inf = start_inference(cfg, port=0)
    cfg.compositing.inference_address = f"127.0.0.1:{inf.port}"
    comp = start_compositing(cfg, port=0, preload=False)
    s = Services(cfg, inf, comp)
    yield s
    stop_services(s)


def client(s: Services, api_key: str | None = None, ca: Path | None = None) -> LipsyncClient:
    return LipsyncClient(s.address, timeout_s=30, ca_file=ca, api_key=api_key)


@pytest.fixture
def ca(pki) -> Path:
    return pki["ca"]


def audio():
    return speech_like(0.5, seed=3)


# -- TLS on the client port -----------------------------------------------------------------
def test_plaintext_to_the_tls_port_fails(secured):
    plain = LipsyncClient(secured.address, timeout_s=5, api_key=key("app"))
    with plain as c, pytest.raises(LipsyncError) as err:
        c.list_models()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_fails(secured, pki):
    with client(secured, key("app"), pki["other_ca"]) as c, pytest.raises(LipsyncError) as err:
        c.list_models()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_with_the_right_ca_works(secured, ca):
    with client(secured, key("app"), ca) as c:
        assert {"alice", "bob"} <= {m.model_id for m in c.list_models()}


# -- mutual TLS between the services ---------------------------------------------------------
def _direct_list_models(address: str, creds: grpc.ChannelCredentials | None) -> None:
    channel = (
        grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    )
    with channel:
        ipb_grpc.InferenceServiceStub(channel).ListModels(common.ListModelsRequest(), timeout=5)


def test_inference_refuses_callers_without_the_compositing_certificate(secured, pki):
    address = secured.inference_address
    for creds in (
        None,  # plaintext
        channel_credentials(str(pki["ca"])),  # TLS, no client certificate
        channel_credentials(  # a client certificate another CA signed
            str(pki["ca"]), str(pki["impostor-client"]), str(pki["impostor-client-key"])
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            _direct_list_models(address, creds)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # ... while the compositing service's own certificate gets in
    _direct_list_models(
        address,
        channel_credentials(
            str(pki["ca"]), str(pki["compositing-client"]), str(pki["compositing-client-key"])
        ),
    )


def test_requests_through_the_compositing_service_succeed(secured, ca):
    with client(secured, key("app"), ca) as c:
        batch = c.composite_batch("alice", 3, audio=audio())
        assert len(batch.frames) == 3 and all(f[:2] == b"\xff\xd8" for f in batch.frames)
        frames = list(c.stream("alice", [audio()]))
        assert frames and frames[0].jpeg[:2] == b"\xff\xd8"
        assert c.health().inference_server_healthy


# -- API keys ----------------------------------------------------------------------------------
def test_no_or_unknown_key_is_unauthenticated(secured, ca):
    for k in (None, "lsk_not_a_key"):
        with client(secured, k, ca) as c:
            for call in (
                c.list_models,
                lambda c=c: c.composite_batch("alice", 2, audio=audio()),
                lambda c=c: list(c.stream("alice", [audio()])),
                lambda c=c: c.load_model("alice"),
            ):
                with pytest.raises(LipsyncError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_is_open_but_hides_the_inference_address(secured, ca):
    with client(secured, None, ca) as c:
        open_health = c.health()
    assert open_health.healthy and open_health.inference_server_url == ""
    with client(secured, key("app"), ca) as c:
        assert c.health().inference_server_url == secured.inference_address
    creds = channel_credentials(str(ca))
    with grpc.secure_channel(secured.address, creds) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_client_scope_renders_but_may_not_load(secured, ca):
    with client(secured, key("app"), ca) as c:
        assert len(c.composite_batch("alice", 2, audio=audio()).frames) == 2
        assert c.model_stats() is not None
        for call in (lambda: c.load_model("alice"), lambda: c.unload_model("bob")):
            with pytest.raises(LipsyncError) as err:
                call()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "admin" in str(err.value)


def test_admin_scope_may_load_and_render(secured, ca):
    with client(secured, key("ops"), ca) as c:
        assert c.load_model("bob") >= 0
        assert len(c.composite_batch("bob", 2, audio=audio()).frames) == 2


def _open_stream(s: Services, ca: Path, api_key: str):
    """A StreamComposite call that stays open until `release` is set; returns (call, release)
    once the service accepted it (its headers came)."""
    release = threading.Event()

    def requests():
        yield cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", sample_rate=16000))
        release.wait(30)

    channel = grpc.secure_channel(s.address, channel_credentials(str(ca)))
    call = cpb_grpc.CompositingServiceStub(channel).StreamComposite(
        requests(), metadata=(("authorization", f"Bearer {api_key}"),), timeout=30
    )
    return call, release, channel


def test_a_key_over_its_stream_limit_is_refused(secured, ca):
    call, release, channel = _open_stream(secured, ca, key("one-stream"))
    try:
        md = dict(call.initial_metadata())
        assert md.get("lipsync-stream") == "accepted"
        with client(secured, key("one-stream"), ca) as c, pytest.raises(LipsyncError) as err:
            list(c.stream("alice", [audio()]))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # another key is not affected
        with client(secured, key("app"), ca) as c:
            assert list(c.stream("alice", [audio()]))
    finally:
        release.set()
        call.cancel()
        channel.close()
    # the slot is released when the stream ends
    deadline = time.monotonic() + 10
    while True:
        try:
            with client(secured, key("one-stream"), ca) as c:
                assert list(c.stream("alice", [audio()]))
            break
        except LipsyncError as exc:
            assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the stream slot was not released"
            time.sleep(0.1)


def test_frame_rate_limit(secured, ca):
    with client(secured, key("slow"), ca) as c:  # 1 frame/s, a bucket of 1
        # admitted (not in debt), takes 10 frames: 9 s of debt (rendering takes less)
        assert len(c.composite_batch("alice", 10, audio=audio()).frames) == 10
        with pytest.raises(LipsyncError) as err:
            c.composite_batch("alice", 1, audio=audio())
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 frames/s" in str(err.value)
        with pytest.raises(LipsyncError) as err:
            list(c.stream("alice", [audio()]))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_stream_is_paced_to_its_key_rate(secured, ca):
    clip = speech_like(2.0, seed=5)  # 49 frames; 20 frames/s with a bucket of 20
    with client(secured, key("paced"), ca) as c:
        t0 = time.monotonic()
        frames = list(c.stream("alice", [clip]))
        elapsed = time.monotonic() - t0
    assert len(frames) >= 45
    assert elapsed >= (len(frames) - 20) / 20 * 0.9


def test_a_refused_request_gives_its_frames_back(secured, ca):
    with client(secured, key("refund"), ca) as c:
        with pytest.raises(LipsyncError):  # success=false: unknown model
            c.composite_batch("nobody", 20, audio=audio())
        assert len(c.composite_batch("alice", 2, audio=audio()).frames) == 2


def test_keys_never_reach_the_logs(secured, ca, caplog):
    caplog.set_level(logging.DEBUG)
    for k in [*ALL_KEYS, "lsk_unknown_key_never_logged"]:
        with client(secured, k, ca) as c:
            for call in (c.list_models, lambda c=c: c.load_model("nobody")):
                try:
                    call()
                except LipsyncError as exc:
                    assert k not in str(exc)
    text = caplog.text
    assert "refused" in text  # the refusals are logged ...
    for k in [*ALL_KEYS, "lsk_unknown_key_never_logged"]:  # ... without the keys
        assert k not in text
        assert auth.hash_key(k) not in text


def test_the_keys_file_is_reloaded_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys.yaml"
    write_keys(path, ["app"])
    store = auth.KeyStore(path)
    assert store.lookup(key("app")) is not None and store.lookup(key("ops")) is None
    write_keys(path, ["app", "ops"])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.lookup(key("ops")).name == "ops"
    path.write_text("- name: broken\n")  # a bad edit keeps the keys there were
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert store.lookup(key("ops")) is not None


def test_keys_file_errors():
    good = {"name": "a", "key_sha256": "0" * 64, "scopes": ["client"]}
    assert auth.parse_keys([good])["0" * 64].allows("client")
    assert not auth.parse_keys([good])["0" * 64].allows("admin")
    assert auth.parse_keys([{**good, "scopes": ["admin"]}])["0" * 64].allows("client")
    for bad in (
        {"name": "a", "key_sha256": "xyz"},
        {**good, "scopes": ["root"]},
        {**good, "max_streams": -1},
        {**good, "key": "plaintext"},
    ):
        with pytest.raises(auth.KeysFileError):
            auth.parse_keys([bad])
    with pytest.raises(auth.KeysFileError):
        auth.parse_keys([good, {**good, "key_sha256": "1" * 64}])  # duplicate name


def test_token_bucket():
    now = [0.0]
    b = auth.TokenBucket(10, clock=lambda: now[0])
    assert b.admit() == 0 and b.take(25) == pytest.approx(1.5)
    assert b.admit() > 0
    now[0] = 1.6
    assert b.admit() == 0


def test_new_key_command(tmp_path, capsys):
    path = tmp_path / "keys.yaml"
    assert (
        admin_cli.main(["new-key", "--name", "svc", "--scopes", "client", "--append", str(path)])
        == 0
    )
    out = capsys.readouterr().out
    new = next(line for line in out.splitlines() if line.startswith(auth.KEY_PREFIX))
    found = auth.load_keys(path)[auth.hash_key(new)]
    assert found.name == "svc" and found.scopes == {"client"}
    assert new not in path.read_text()  # only the hash is stored
    assert admin_cli.main(["new-key", "--name", "svc", "--append", str(path)]) == 2  # same name


def test_dev_certs_command(tmp_path):
    assert admin_cli.main(["dev-certs", "--out", str(tmp_path)]) == 0
    for stem in ("ca", "inference", "compositing", "compositing-client", "client"):
        assert (tmp_path / f"{stem}.pem").is_file()
    # they fit together: server credentials load, a client with the client cert too
    assert server_credentials(
        str(tmp_path / "inference.pem"),
        str(tmp_path / "inference-key.pem"),
        str(tmp_path / "ca.pem"),
    )
    assert channel_credentials(
        str(tmp_path / "ca.pem"),
        str(tmp_path / "compositing-client.pem"),
        str(tmp_path / "compositing-client-key.pem"),
    )


def test_tls_settings_that_do_not_fit_are_refused(pki):
    with pytest.raises(TLSConfigError):
        server_credentials(str(pki["inference"]), str(pki["compositing-key"]))  # other key
    with pytest.raises(TLSConfigError):
        server_credentials(None, str(pki["inference-key"]))
    with pytest.raises(TLSConfigError):
        channel_credentials(
            None, str(pki["compositing-client"]), str(pki["compositing-client-key"])
        )
    with pytest.raises(LipsyncError):
        LipsyncClient("localhost:1", ca_file="/nonexistent/ca.pem")


# -- certificate rotation ----------------------------------------------------------------------
def test_server_certificates_are_reloaded_when_their_files_change(tmp_path, pki):
    """The compositing port's certificate is replaced on disk by one of another CA: new
    connections get the new one, without a restart."""
    from lipsync.serving.grpc_server import add_health, bind, create_server

    cert, keyf = tmp_path / "server.pem", tmp_path / "server-key.pem"
    cert.write_bytes(pki["compositing"].read_bytes())
    keyf.write_bytes(pki["compositing-key"].read_bytes())
    server = create_server(2, 1 << 20)
    add_health(server, [])
    port = bind(server, "127.0.0.1", 0, server_credentials(str(cert), str(keyf)))
    server.start()

    def check(ca_path: Path) -> bool:
        creds = channel_credentials(str(ca_path))
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=3
                )
            except grpc.RpcError:
                return False
        return True

    try:
        assert check(pki["ca"]) and not check(pki["other_ca"])
        keyf.write_bytes(pki["other-compositing-key"].read_bytes())
        cert.write_bytes(pki["other-compositing"].read_bytes())
        future = time.time_ns() + 10**9
        for f in (cert, keyf):
            os.utime(f, ns=(future, future))
        assert check(pki["other_ca"]) and not check(pki["ca"])
    finally:
        server.stop(0)


# -- the gateway -------------------------------------------------------------------------------
def test_origin_rule():
    assert origin_allowed(None, "h:8080", [])  # not a browser
    assert origin_allowed("http://h:8080", "h:8080", [])
    assert origin_allowed("https://H:8080", "h:8080", [])  # behind a TLS proxy
    assert not origin_allowed("http://evil.example", "h:8080", [])
    assert not origin_allowed("http://h:8081", "h:8080", [])
    assert not origin_allowed("null", "h:8080", [])
    assert origin_allowed("https://app.example", "h:8080", ["https://app.example"])
    assert origin_allowed("http://evil.example", "h:8080", ["*"])


def _gateway(secured, ca):
    return create_app(secured.address, credentials=channel_credentials(str(ca)))


def test_gateway_refuses_a_foreign_origin(secured, ca):
    async def body():
        async with TestClient(TestServer(_gateway(secured, ca))) as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect("/ws", origin="http://evil.example")
            assert err.value.status == 403
            own = f"http://{http.server.host}:{http.server.port}"
            ws = await http.ws_connect("/ws", origin=own)
            await ws.close()

    asyncio.run(body())


def _gateway_session(http, start: dict) -> asyncio.Future:
    async def go():
        ws = await http.ws_connect("/ws")
        await ws.send_json({"type": "start", "model": "alice", "sample_rate": 16000, **start})
        texts = []
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                texts.append(msg.json())
                if texts[-1]["type"] == "started":
                    await ws.send_json({"type": "stop"})
        return texts, ws.close_code

    return go()


def test_gateway_passes_the_page_key_on(secured, ca, caplog):
    caplog.set_level(logging.DEBUG)

    async def body():
        async with TestClient(TestServer(_gateway(secured, ca))) as http:
            assert (await http.get("/api/models")).status == 401
            bad = await http.get("/api/models", headers={"Authorization": "Bearer nope"})
            assert bad.status == 401
            ok = await http.get("/api/models", headers={"Authorization": f"Bearer {key('app')}"})
            assert ok.status == 200 and any(m["model_id"] == "alice" for m in await ok.json())
            refused = await _gateway_session(http, {})
            accepted = await _gateway_session(http, {"api_key": key("app"), "realtime": False})
            return refused, accepted

    (texts, code), (ok_texts, ok_code) = asyncio.run(body())
    assert [t["type"] for t in texts] == ["error"] and texts[0]["code"] == "UNAUTHENTICATED"
    assert code == 1008
    assert [t["type"] for t in ok_texts] == ["started", "end"] and ok_code == 1000
    assert key("app") not in caplog.text


def test_gateway_session_limit(secured, ca):
    async def body():
        app = create_app(secured.address, credentials=channel_credentials(str(ca)), max_sessions=1)
        async with TestClient(TestServer(app)) as http:
            first = await http.ws_connect("/ws")
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect("/ws")
            assert err.value.status == 503
            await first.close()

    asyncio.run(body())


def test_issued_certificates_carry_the_names(pki):
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki["inference"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert isinstance(make_ca(), Issued)


def test_the_health_only_port_is_plaintext_and_only_health():
    from grpc_health.v1 import health

    from lipsync.rpc.tls import serve_health_port

    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = free_port()
    server = serve_health_port(servicer, "127.0.0.1", port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            with pytest.raises(grpc.RpcError) as err:
                cpb_grpc.CompositingServiceStub(channel).ListModels(
                    cpb.ListModelsRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)
    assert serve_health_port(servicer, "127.0.0.1", 0) is None


# -- the deployment files ----------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def _lipsync_env_names_fields(env: dict[str, str]) -> None:
    from lipsync.config import ignored_env_vars, load_config

    env = {k: str(v) for k, v in env.items() if k.startswith("LIPSYNC_") and k != "LIPSYNC_CONFIG"}
    assert env and ignored_env_vars(env) == [], "every variable names a config field"
    load_config(env=env)  # and the values parse


def test_compose_tls_file_sets_real_config_fields():
    doc = yaml.safe_load((REPO / "deploy" / "compose.tls.yml").read_text())
    for name, svc in doc["services"].items():
        _lipsync_env_names_fields(svc["environment"])
        for secret in svc["secrets"]:
            assert secret in doc["secrets"], (name, secret)
            for value in svc["environment"].values():
                if value.startswith("/run/secrets/"):
                    assert value.removeprefix("/run/secrets/") in doc["secrets"]


def test_k8s_tls_overlay_mounts_the_secrets_and_probes_the_health_ports():
    from tests.docker.manifests import kubectl_problem, render

    if kubectl_problem():
        pytest.skip(kubectl_problem())
    docs = render("tls")
    kinds = {d["kind"] for d in docs}
    assert "NetworkPolicy" in kinds
    specs = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    health = {"lipsync-inference": 50061, "lipsync-compositing": 50062}
    for name, spec in specs.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            env = {e["name"]: e["value"] for e in c["env"]}
            _lipsync_env_names_fields(env)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            for value in env.values():  # every file named is on a mounted secret
                if value.startswith("/etc/lipsync/") and not value.endswith("config.yaml"):
                    folder = str(Path(value).parent)
                    assert "secret" in volumes[mounts[folder]], (name, value)
            if c["name"] != "web":
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"]["port"] == health[name]


def test_lipsync_render_with_tls_and_a_key(secured, ca, tmp_path, capsys, monkeypatch):
    import soundfile as sf

    from lipsync.cli import render as render_cli

    wav = tmp_path / "a.wav"
    sf.write(str(wav), audio(), 16000)
    base = ["--model", "alice", "--audio", str(wav), "--server", secured.address, "-q"]
    base += ["--ca", str(ca), "--out", str(tmp_path / "frames") + "/"]
    monkeypatch.delenv("LIPSYNC_API_KEY", raising=False)
    assert render_cli.main(base) == 2
    assert "an API key is required" in capsys.readouterr().err
    monkeypatch.setenv("LIPSYNC_API_KEY", key("app"))
    assert render_cli.main(base) == 0
    assert len(list((tmp_path / "frames").glob("*.jpg"))) > 5
    assert render_cli.main([*base, "--api-key", "lsk_wrong"]) == 2
    err = capsys.readouterr().err
    assert "lsk_wrong" not in err and key("app") not in err
