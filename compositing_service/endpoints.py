"""The inference replicas the compositing service can reach: which addresses
`compositing.inference_address` names, which of them answer, and each one's client.

The address is a comma-separated list of targets, each either `host:port` (taken as it
is; gRPC resolves the name when it connects) or `dns:///name:port`, a name whose every
address is one replica (a Kubernetes headless Service has one A record per ready pod).
`dns:///` names are re-resolved every `routing.refresh_s` with `socket.getaddrinfo`;
addresses that appear get a client and are health-checked at once, addresses that
disappear are closed. Every endpoint is health-checked (grpc.health.v1 Check) every
`routing.health_interval_s`; a call that fails with UNAVAILABLE marks its endpoint down
at once (`EndpointSet.mark_down`), and the next good Check brings it back.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from compositing_service.inference_client import InferenceClient

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class Target:
    """One part of `inference_address`: a fixed `host:port`, or a `dns:///` name."""

    host: str
    port: int
    dns: bool = False

    @property
    def text(self) -> str:
        return f"{DNS_SCHEME if self.dns else ''}{join_host_port(self.host, self.port)}"


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"inference address {text!r}: expected host:port")
    return host, int(port)


def parse_targets(address: str) -> list[Target]:
    """The targets of a comma-separated `inference_address`."""
    out: list[Target] = []
    for part in (p.strip() for p in address.split(",")):
        if not part:
            continue
        dns = part.startswith(DNS_SCHEME)
        host, port = split_host_port(part[len(DNS_SCHEME) :] if dns else part)
        target = Target(host, port, dns)
        if target not in out:
            out.append(target)
    if not out:
        raise ValueError(f"inference address {address!r} names no endpoint")
    return out


def is_multi_target(address: str) -> bool:
    """Whether `address` needs the router: more than one target, or a `dns:///` name."""
    targets = parse_targets(address)
    return len(targets) > 1 or any(t.dns for t in targets)


def resolve(target: Target) -> list[str]:
    """The endpoint addresses of a target: itself, or every address its name has now."""
    if not target.dns:
        return [join_host_port(target.host, target.port)]
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    found: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = join_host_port(str(sockaddr[0]), target.port)
        if addr not in found:
            found.append(addr)
    return found


@dataclass
class Endpoint:
    """One inference replica: its client, whether it answers, what runs on it now."""

    address: str
    client: InferenceClient
    healthy: bool = False
    inflight: int = 0  # calls running on it now (this compositing replica's)
    calls: int = 0
    failures: int = 0
    down_since: float = 0.0
    fresh: bool = True  # its channel has never failed
    added_at: float = field(default_factory=time.monotonic)


class EndpointSet:
    """The endpoints of the targets, kept fresh by one background thread."""

    def __init__(
        self,
        address: str,
        make_client: Callable[[str], InferenceClient],
        refresh_s: float = 5.0,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 1.0,
        on_change: Callable[[], None] | None = None,
        resolver: Callable[[Target], list[str]] = resolve,
    ):
        self.address = address
        self.targets = parse_targets(address)
        self._make_client = make_client
        self.refresh_s = refresh_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self._on_change = on_change
        self._resolver = resolver
        self.lock = threading.Lock()
        self.endpoints: dict[str, Endpoint] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()
        self.check_health()

    # -- membership ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Resolve every target again; add new addresses, close vanished ones. A name that
        fails to resolve keeps its last addresses (a DNS hiccup is not a dead replica)."""
        wanted: list[str] = []
        failed = False
        for t in self.targets:
            try:
                wanted += [a for a in self._resolver(t) if a not in wanted]
            except OSError as exc:
                failed = True
                log.warning("resolving %s failed: %s", t.text, exc)
        added: list[Endpoint] = []
        removed: list[Endpoint] = []
        with self.lock:
            for addr in wanted:
                if addr not in self.endpoints:
                    ep = Endpoint(addr, self._make_client(addr))
                    self.endpoints[addr] = ep
                    added.append(ep)
            if not failed:
                for addr in [a for a in self.endpoints if a not in wanted]:
                    removed.append(self.endpoints.pop(addr))
        for ep in added:
            log.info("inference endpoint %s added", ep.address)
            self._check(ep)
        for ep in removed:
            log.info("inference endpoint %s removed (no longer resolved)", ep.address)
            ep.client.close()
        if (added or removed) and self._on_change:
            self._on_change()

    # -- health -------------------------------------------------------------------------
    def _check(self, ep: Endpoint) -> None:
        if ep.healthy or ep.fresh:
            ep.fresh = False
            ok = ep.client.healthy(self.health_timeout_s)
        else:
            # A channel that failed waits out gRPC's reconnect backoff (up to 2 min) before
            # it tries again; probe a down endpoint on a fresh channel, and keep that one.
            fresh = self._make_client(ep.address)
            ok = fresh.healthy(self.health_timeout_s)
            if ok:
                old, ep.client = ep.client, fresh
                # calls still running on the old channel fail over by themselves
                closer = threading.Timer(60.0, old.close)
                closer.daemon = True
                closer.start()
            else:
                fresh.close()
        changed = False
        with self.lock:
            if ok != ep.healthy:
                changed = True
                ep.healthy = ok
                ep.down_since = 0.0 if ok else time.monotonic()
        if changed:
            log.info("inference endpoint %s is %s", ep.address, "up" if ok else "down")
            if self._on_change:
                self._on_change()

    def check_health(self) -> None:
        for ep in self.all():
            self._check(ep)

    def mark_down(self, address: str, why: str = "") -> None:
        with self.lock:
            ep = self.endpoints.get(address)
            if ep is None or not ep.healthy:
                return
            ep.healthy = False
            ep.failures += 1
            ep.down_since = time.monotonic()
        log.warning("inference endpoint %s marked down: %s", address, why)
        if self._on_change:
            self._on_change()

    # -- views --------------------------------------------------------------------------
    def all(self) -> list[Endpoint]:
        with self.lock:
            return list(self.endpoints.values())

    def healthy(self) -> list[Endpoint]:
        with self.lock:
            return [e for e in self.endpoints.values() if e.healthy]

    def get(self, address: str) -> Endpoint | None:
        with self.lock:
            return self.endpoints.get(address)

    # -- the background thread ----------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return

        def run() -> None:
            next_refresh = time.monotonic() + self.refresh_s
            tick = max(0.05, min(self.health_interval_s, self.refresh_s))
            while not self._stop.wait(tick):
                try:
                    if any(t.dns for t in self.targets) and time.monotonic() >= next_refresh:
                        next_refresh = time.monotonic() + self.refresh_s
                        self.refresh()
                    self.check_health()
                except Exception:  # the thread must outlive any one bad round
                    log.exception("endpoint refresh failed")

        self._thread = threading.Thread(target=run, name="inference-endpoints", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.lock:
            eps = list(self.endpoints.values())
            self.endpoints.clear()
        for ep in eps:
            ep.client.close()
