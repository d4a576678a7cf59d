"""API keys and their limits: the keys file (`auth.api_keys_file`), each key's scopes,
its frame-rate token bucket and stream count, and the key on the wire (`authorization:
Bearer <key>` metadata). The gRPC interceptor that applies them is
lipsync/serving/auth_interceptor.py; docs/SECURITY.md describes both.

The keys file is a YAML list; only the SHA-256 of a key is stored:

    - name: web-frontend
      key_sha256: 9f86d0...          # hex SHA-256 of the key (lipsync-admin new-key)
      scopes: [client]               # client | admin (admin includes client)
      max_streams: 4                 # concurrent StreamComposite calls; 0: no limit
      max_frames_per_second: 100     # token bucket on frames; 0: no limit

It is re-read when its mtime changes (checked at most once a second); a file that no
longer loads keeps the previous keys, with an error in the log. Keys never reach the
log: refusals name the key's `name`, or say that no or an unknown key was sent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lipsync.rpc.bearer import bearer_token

log = logging.getLogger(__name__)

SCOPES = ("client", "admin")
KEY_PREFIX = "lsk_"
BURST_S = 1.0  # a key's bucket holds this many seconds of frames
RELOAD_CHECK_S = 1.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"name", "key_sha256", "scopes", "max_streams", "max_frames_per_second"}


class KeysFileError(ValueError):
    """The keys file is missing or malformed; the message says where."""


def hash_key(key: str) -> str:
    """The hex SHA-256 the keys file stores for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    name: str
    key_sha256: str
    scopes: frozenset[str]
    max_streams: int = 0
    max_frames_per_second: float = 0.0

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def entry(self) -> dict[str, Any]:
        """The keys file entry of this key."""
        return {
            "name": self.name,
            "key_sha256": self.key_sha256,
            "scopes": sorted(self.scopes, key=SCOPES.index),
            "max_streams": self.max_streams,
            "max_frames_per_second": self.max_frames_per_second,
        }


def parse_keys(data: Any, where: str = "keys file") -> dict[str, ApiKey]:
    """{key_sha256: ApiKey} of a loaded keys file (a list of entries)."""
    if data is None:
        data = []
    if not isinstance(data, list):
        raise KeysFileError(f"{where}: expected a list of keys")
    out: dict[str, ApiKey] = {}
    names: set[str] = set()
    for i, e in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise KeysFileError(f"{at}: expected a mapping")
        unknown = set(e) - _FIELDS
        if unknown:
            raise KeysFileError(f"{at}: unknown field(s) {sorted(unknown)}")
        name, digest = e.get("name"), e.get("key_sha256")
        if not isinstance(name, str) or not name:
            raise KeysFileError(f"{at}: 'name' must be a non-empty string")
        if name in names:
            raise KeysFileError(f"{at}: duplicate name {name!r}")
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise KeysFileError(f"{at} ({name}): 'key_sha256' must be 64 hex digits")
        scopes = e.get("scopes", ["client"])
        if isinstance(scopes, str):
            scopes = [scopes]
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
            raise KeysFileError(f"{at} ({name}): 'scopes' must be a list of {SCOPES}")
        max_streams = e.get("max_streams", 0)
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 0:
            raise KeysFileError(f"{at} ({name}): 'max_streams' must be an integer >= 0")
        fps = e.get("max_frames_per_second", 0)
        if isinstance(fps, bool) or not isinstance(fps, int | float) or fps < 0:
            raise KeysFileError(f"{at} ({name}): 'max_frames_per_second' must be >= 0")
        names.add(name)
        out[digest.lower()] = ApiKey(name, digest.lower(), frozenset(scopes), max_streams, fps)
    return out


def load_keys(path: str | Path) -> dict[str, ApiKey]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{path}: not YAML: {exc}") from None
    return parse_keys(data, str(path))


class TokenBucket:
    """Frames per second with debt: `admit` says whether the bucket is not in debt,
    `take` removes tokens (possibly into debt) and returns how long the caller would
    wait for them to be paid back."""

    def __init__(self, rate: float, burst_s: float = BURST_S, clock=time.monotonic):
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate * burst_s)
        self.clock = clock
        self.tokens = self.capacity
        self.t = clock()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def admit(self) -> float:
        """0 when a request may start now, else the seconds until it may."""
        with self.lock:
            self._refill()
            return 0.0 if self.tokens > 0 else (1 - self.tokens) / self.rate

    def take(self, n: float) -> float:
        with self.lock:
            self._refill()
            self.tokens -= n
            return max(0.0, -self.tokens / self.rate)


@dataclass
class KeyUsage:
    """A key's use across its calls: open streams and its frame-rate bucket."""

    streams: int = 0
    bucket: TokenBucket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class KeyStore:
    """The keys of a file, re-read when it changes, and each key's usage (kept across
    reloads by the key's name)."""

    def __init__(self, path: str | Path, clock=time.monotonic):
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._keys = load_keys(self.path)
        self._checked = clock()
        self._usage: dict[str, KeyUsage] = {}
        log.info("API keys: %d key(s) from %s", len(self._keys), self.path)

    def _stat(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1)
        return (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self, force: bool = False) -> None:
        now = self.clock()
        with self._lock:
            if not force and now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                keys = load_keys(self.path)
            except KeysFileError as exc:
                log.error("API keys file changed but does not load (keeping the old keys): %s", exc)
                return
            self._keys = keys
        log.info("API keys reloaded: %d key(s) from %s", len(keys), self.path)

    def lookup(self, presented: str) -> ApiKey | None:
        self.reload_if_changed()
        return self._keys.get(hash_key(presented))

    def usage(self, key: ApiKey) -> KeyUsage:
        with self._lock:
            u = self._usage.get(key.name)
            if u is None:
                u = self._usage[key.name] = KeyUsage()
            rate = key.max_frames_per_second
            if rate and (u.bucket is None or u.bucket.rate != rate):
                u.bucket = TokenBucket(rate, clock=self.clock)
            elif not rate:
                u.bucket = None
            return u


def bearer_key(metadata: Any) -> str | None:
    """The key of an `authorization: Bearer <key>` metadata entry, if any."""
    for k, v in metadata or ():
        if k == "authorization" and (token := bearer_token(v)):
            return token
    return None
