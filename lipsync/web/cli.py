"""`python -m lipsync.web`: the gateway's command line (defaults from the config's `web`
section) and its server."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
from collections.abc import Mapping

from aiohttp import web

from lipsync.config import load_config
from lipsync.rpc.tls import channel_credentials
from lipsync.serving.logs import setup_logging
from lipsync.web.app import create_app

log = logging.getLogger("lipsync.web")


def parse_args(
    argv: list[str] | None = None, env: Mapping[str, str] | None = None
) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", help="YAML config file (default: $LIPSYNC_CONFIG)")
    known, _ = pre.parse_known_args(argv)
    full = load_config(known.config, env=os.environ if env is None else env)
    cfg = full.web
    ap = argparse.ArgumentParser(
        prog="python -m lipsync.web",
        parents=[pre],
        description="Serve the lip-sync web page and its gateway (WebRTC, WebSocket). "
        "Defaults come from the config's `web` section (LIPSYNC_WEB__PORT, "
        "COMPOSITING_ADDRESS, ...).",
    )
    ap.add_argument("--port", type=int, default=cfg.port, help="HTTP port (default %(default)s)")
    ap.add_argument(
        "--server",
        default=cfg.compositing_address,
        help="compositing service host:port (default %(default)s)",
    )
    ap.add_argument("--host", default=cfg.host, help="bind address (default %(default)s)")
    ap.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--keyfile", help="private key of --certfile (PEM)")
    tls = cfg.compositing_tls
    ap.add_argument(
        "--ca", default=tls.ca_file, help="TLS to the compositing service: its CA (PEM)"
    )
    ap.add_argument("--cert", default=tls.cert_file, help="client certificate (PEM), mutual TLS")
    ap.add_argument("--key", default=tls.key_file, help="private key (PEM) of --cert")
    ap.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        default=None,
        help="an origin (scheme://host[:port]) whose pages may open /ws besides the "
        "page's own; repeatable; '*': any (default: web.allowed_origins)",
    )
    ap.add_argument(
        "--max-sessions",
        type=int,
        default=cfg.max_sessions,
        help="concurrent WebSocket sessions (default %(default)s)",
    )
    ap.add_argument(
        "--webrtc-max-sessions",
        type=int,
        default=cfg.webrtc_max_sessions,
        help="concurrent WebRTC viewers (default %(default)s)",
    )
    ap.add_argument(
        "--ice-server",
        dest="ice_servers",
        action="append",
        default=None,
        help="a STUN/TURN URL for WebRTC (stun:host:port, turn:host:port); repeatable "
        "(default: web.ice_servers; TURN credentials: web.ice_username / ice_credential)",
    )
    args = ap.parse_args(argv)
    if args.ice_servers is None:
        args.ice_servers = list(cfg.ice_servers)
    args.ice_username, args.ice_credential = cfg.ice_username, cfg.ice_credential
    if args.allowed_origins is None:
        args.allowed_origins = list(cfg.allowed_origins)
    args.log_level, args.log_format = full.log_level, full.log_format  # lipsync.serving.logs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format, "web")
    # aioice logs every ICE candidate pair's state at INFO: a dozen lines per viewer
    logging.getLogger("aioice").setLevel(max(logging.WARNING, logging.getLogger().level))
    ssl_ctx = None
    if args.certfile:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.certfile, args.keyfile)
    scheme = "https" if ssl_ctx else "http"
    shown = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
    log.info(
        "serving %s://%s:%d/ (compositing service at %s)", scheme, shown, args.port, args.server
    )
    web.run_app(
        create_app(
            args.server,
            credentials=channel_credentials(args.ca, args.cert, args.key),
            allowed_origins=args.allowed_origins,
            max_sessions=args.max_sessions,
            webrtc_max_sessions=args.webrtc_max_sessions,
            ice_servers=args.ice_servers,
            ice_username=args.ice_username,
            ice_credential=args.ice_credential,
        ),
        host=args.host,
        port=args.port,
        ssl_context=ssl_ctx,
        print=None,
        access_log=None,
    )
    return 0
