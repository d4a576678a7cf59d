"""Who may call the compositing service: the scope each RPC needs, what counts as frames
for a key's rate limit, what `Health` hides from callers without a key (docs/SECURITY.md).
The mechanics are lipsync/serving/api_keys.py (API keys and their limits),
lipsync/serving/auth_interceptor.py (the check) and lipsync/rpc/tls.py (TLS)."""

from __future__ import annotations

import grpc

from lipsync.config import Config
from lipsync.rpc.tls import channel_credentials_of, server_credentials_of
from lipsync.serving.auth_interceptor import MethodPolicy, interceptors_for

PREFIX = "/compositing.CompositingService/"


def _hide_addresses(resp):
    resp.inference_server_url = ""
    return resp


POLICIES = {
    PREFIX + "InferBatchComposite": MethodPolicy(
        "client",
        frames=lambda req: req.batch_size,
        refund=lambda resp: not resp.success,
    ),
    PREFIX + "StreamComposite": MethodPolicy("client", stream=True),
    PREFIX + "ListModels": MethodPolicy("client"),
    PREFIX + "GetModelStats": MethodPolicy("client"),
    PREFIX + "LoadModel": MethodPolicy("admin"),
    PREFIX + "UnloadModel": MethodPolicy("admin"),
    # Open for probes and monitors; without a valid key it does not say where the
    # inference service is.
    PREFIX + "Health": MethodPolicy(None, redact=_hide_addresses),
}


def interceptors(cfg: Config) -> list[grpc.ServerInterceptor]:
    """The API-key interceptor when `auth.api_keys_file` is set; else none."""
    return interceptors_for(cfg.auth.api_keys_file, POLICIES)


def server_credentials(cfg: Config) -> grpc.ServerCredentials | None:
    """TLS of the client port (`compositing.tls`); None: plaintext."""
    return server_credentials_of(cfg.compositing.tls)


def inference_credentials(cfg: Config) -> grpc.ChannelCredentials | None:
    """How this service reaches the inference service (`compositing.inference_tls`)."""
    return channel_credentials_of(cfg.compositing.inference_tls)
