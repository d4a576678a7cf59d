"""The gateway's checks of which page may open a session (its Origin) and which key a
browser sent (docs/SECURITY.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit


def _netloc(origin: str) -> str | None:
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return parts.netloc.lower()


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a WebSocket with this `Origin` header may connect to the gateway reached
    as `host` (the Host header).

    No Origin header: allowed (not a browser page; browsers always send one, and the
    check exists against other sites' pages using a visitor's browser). Otherwise the
    page's own origin (its host[:port] equals the Host the browser connected to; the
    scheme is not compared, so a TLS-terminating proxy in front keeps working) or one of
    `allowed` (exact `scheme://host[:port]`, or `*` for any)."""
    if origin is None:
        return True
    allowed = [a.strip().rstrip("/") for a in allowed]
    if "*" in allowed:
        return True
    if origin.strip().rstrip("/").lower() in (a.lower() for a in allowed):
        return True
    netloc = _netloc(origin)
    return netloc is not None and host is not None and netloc == host.strip().lower()


def start_api_key(text: str) -> str | None:
    """The `api_key` of the page's start message, if it has one (parse_start checks the
    rest); never logged."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return None
    key = obj.get("api_key") if isinstance(obj, dict) else None
    return key.strip() if isinstance(key, str) and key.strip() else None
