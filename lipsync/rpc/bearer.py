"""API keys on the wire: `authorization: Bearer <key>` (gRPC metadata, or the HTTP
header of the same name at the web gateway); docs/SECURITY.md."""

from __future__ import annotations


def bearer_token(value: str | None) -> str | None:
    """The key of an `authorization` value `Bearer <key>` (scheme case-insensitive), if
    that is what it holds."""
    if not isinstance(value, str):
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `api_key` (none without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
