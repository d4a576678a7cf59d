"""Avatar-aware routing of inference calls over N inference replicas
(docs/SCALING.md): `RoutedInferenceClient` has `InferenceClient`'s interface, so the
dataplane, the streams and the model admin use it unchanged.

Policy, per call of avatar `m` (all under one lock, a few microseconds):

- `m`'s replicas are the ones the router placed it on (kept in `placement[m]`, first the
  primary). The call goes to the primary while its in-flight calls are under the
  bound `max(spread_min_inflight, ceil(spread_factor * (in flight + 1) / healthy
  replicas))` (consistent hashing with bounded loads, Mirrokni et al.); so an avatar's
  calls, a stream's included, stay on one replica while it is healthy and not
  overloaded. While an avatar has several replicas, each calling thread (a stream runs
  its calls on a thread of its own) keeps the replica it got until that one dies or
  passes twice the bound.
- A cold avatar (no healthy replica holds it) goes to the least-loaded healthy replica:
  fewest calls in flight, then fewest avatars placed (so the replicas' registries fill
  evenly and their capacities add up), then the highest rendezvous hash of
  (avatar, replica) (deterministic ties). With `cold_choices: k` only the avatar's first
  k replicas by rendezvous hash are candidates: several compositing replicas, each with
  its own router, then agree on where an avatar goes (at most k copies fleet-wide).
- A hot avatar whose replicas are all at the bound for `spread_after` calls in a row (a
  burst is not a trend: each spread costs a load) spreads to one more replica (the
  least-loaded one that does not hold it, up to `max_replicas_per_avatar`); when it has
  not needed all of its replicas for `cool_s`, the last one added is drawn back (and,
  with `unload_on_drawback`, that replica is asked to unload it).
- A call that fails because its replica is gone (UNAVAILABLE, or another failure after
  which the replica fails its health check) marks the replica down, forgets what was
  placed on it and runs again on another replica: Infer is idempotent (same inputs,
  same mouths), so a retried chunk is the same chunk. Any retries and deadlines inside
  `InferenceClient` happen below this, per replica.

Replicas known at start hold nothing until the router places avatars on them, or until
the first sync (every `refresh_s`) adopts what their ListModels says they hold (so a
restarted compositing replica routes to where avatars already are).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from compositing_service.endpoints import (
    Endpoint,
    EndpointSet,
    Target,
    is_multi_target,
    resolve,
)
from compositing_service.inference_client import InferCall, InferenceClient, Mouths
from lipsync.config import Config, RoutingConfig
from lipsync.proto import common_pb2 as common
from lipsync.proto import inference_pb2 as ipb

log = logging.getLogger(__name__)

# Failures after which the same call runs on another replica.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# Failures that are a replica's death when its health check fails right after.
SUSPECT_CODES = frozenset(
    {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
)


@dataclass
class RouterStats:
    calls: int = 0
    hits: int = 0  # calls sent to a replica the avatar was already placed on
    cold: int = 0  # placements of an avatar no healthy replica held
    spreads: int = 0
    drawbacks: int = 0
    failovers: int = 0
    per_endpoint: Counter = field(default_factory=Counter)


class NoReplicaError(grpc.RpcError):
    """No healthy inference replica is left to run a call (seen as UNAVAILABLE)."""

    def __init__(self, message: str):
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message


def rendezvous_score(model_id: str, address: str) -> int:
    """The rendezvous (highest random weight) hashing score of an avatar on a replica: an
    avatar's replicas ranked by it are the same in every router."""
    return int.from_bytes(hashlib.blake2b(f"{model_id}|{address}".encode(), digest_size=8).digest())


def _inflight(e: Endpoint) -> int:
    return e.inflight


class RoutedInferenceClient:
    """The inference client of a set of replicas; see the module's docstring."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        timeout_s: float,
        transfer: str,
        *,
        routing: RoutingConfig | None = None,
        make_client: Callable[[str], InferenceClient] | None = None,
        start_threads: bool = True,
        resolver: Callable[[Target], list[str]] = resolve,
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.routing = routing or RoutingConfig()  # compositing.routing
        make = make_client or (lambda a: InferenceClient(a, max_message_bytes, timeout_s, transfer))
        self._lock = threading.Lock()
        self.placement: dict[str, list[str]] = {}
        self._model_inflight: Counter = Counter()
        self._hot_at: dict[str, float] = {}  # last time an avatar needed all its replicas
        self._spread_at: dict[str, float] = {}
        self._over: Counter = Counter()  # calls in a row that found every replica at the bound
        # (calling thread, avatar) -> replica, while the avatar has several: a stream's
        # calls come from its own thread and stay on one replica
        self._affinity: dict[tuple[int, str], str] = {}
        self.stats = RouterStats()
        self.endpoints = EndpointSet(
            address,
            make,
            refresh_s=self.routing.refresh_s,
            health_interval_s=self.routing.health_interval_s,
            health_timeout_s=self.routing.health_timeout_s,
            resolver=resolver,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_threads:
            self.endpoints.start()
            self._thread = threading.Thread(target=self._maintain, name="router", daemon=True)
            self._thread.start()

    # -- choosing a replica -------------------------------------------------------------
    def _placed_counts(self) -> Counter:
        return Counter(a for reps in self.placement.values() for a in reps)

    def _least_loaded(self, model_id: str, candidates: list[Endpoint]) -> Endpoint:
        placed = self._placed_counts()
        return min(
            candidates,
            key=lambda e: (e.inflight, placed[e.address], -rendezvous_score(model_id, e.address)),
        )

    def _bound(self, healthy: list[Endpoint]) -> int:
        total = sum(e.inflight for e in healthy)
        fair = math.ceil(self.routing.spread_factor * (total + 1) / len(healthy))
        return max(self.routing.spread_min_inflight, fair)

    def acquire(self, model_id: str, exclude: frozenset[str] | set[str] = frozenset()) -> Endpoint:
        """The replica for one call of `model_id` (counted in flight until `release`)."""
        healthy = self._healthy(exclude)
        now = time.monotonic()
        with self._lock:
            by_address = {e.address: e for e in healthy}
            placed = [by_address[a] for a in self.placement.get(model_id, []) if a in by_address]
            if placed:
                chosen, hit = self._pick_placed(model_id, placed, healthy, now)
            else:
                chosen, hit = self._place_cold(model_id, healthy), False
            self._count_call(model_id, chosen, hit, now)
        return chosen

    def _healthy(self, exclude: frozenset[str] | set[str]) -> list[Endpoint]:
        """The healthy replicas not in `exclude` (if none, after one more health check);
        NoReplicaError if there are none."""
        healthy = [e for e in self.endpoints.healthy() if e.address not in exclude]
        if not healthy:
            self.endpoints.check_health()  # one look before giving up: any back?
            healthy = [e for e in self.endpoints.healthy() if e.address not in exclude]
        if not healthy:
            raise NoReplicaError(f"no healthy inference replica at {self.address}")
        return healthy

    def _place_cold(self, model_id: str, healthy: list[Endpoint]) -> Endpoint:
        """Place an avatar no healthy replica holds on the least-loaded candidate."""
        candidates = healthy
        k = self.routing.cold_choices
        if 0 < k < len(healthy):
            # the avatar's first k replicas by rendezvous hash: the same k in every
            # compositing replica's router, so they do not scatter an avatar
            candidates = sorted(healthy, key=lambda e: -rendezvous_score(model_id, e.address))[:k]
        chosen = self._least_loaded(model_id, candidates)
        self.placement[model_id] = [chosen.address]
        self.stats.cold += 1
        return chosen

    def _pick_placed(
        self, model_id: str, reps: list[Endpoint], healthy: list[Endpoint], now: float
    ) -> tuple[Endpoint, bool]:
        """One of the avatar's healthy replicas `reps` (first the primary), or a replica it
        spreads to; and whether the avatar was already there (a hit)."""
        bound = self._bound(healthy)
        kept = self._kept_replica(model_id, reps, bound)
        if kept is not None:
            return kept, True  # a caller (a stream's thread) keeps its replica
        under = [e for e in reps if e.inflight < bound]
        if under:
            self._over.pop(model_id, None)
            primary = reps[0]
            return (primary if primary.inflight < bound else min(under, key=_inflight)), True
        spread = self._spread(model_id, reps, healthy, now)
        if spread is not None:
            return spread, False
        return min(reps, key=_inflight), True

    def _kept_replica(self, model_id: str, reps: list[Endpoint], bound: int) -> Endpoint | None:
        """The replica this calling thread got last time for an avatar on several, while
        it has fewer than twice the bound in flight."""
        if len(reps) < 2:
            return None
        address = self._affinity.get((threading.get_ident(), model_id))
        for e in reps:
            if e.address == address and e.inflight < 2 * bound:
                return e
        return None

    def _spread(
        self, model_id: str, reps: list[Endpoint], healthy: list[Endpoint], now: float
    ) -> Endpoint | None:
        """All of the avatar's replicas are at the bound: after `spread_after` such calls
        in a row, place it on one more (the least-loaded other one), up to
        `max_replicas_per_avatar`; None while it stays where it is."""
        placed = self.placement[model_id]
        self._over[model_id] += 1  # all its replicas at the bound, again
        others = [e for e in healthy if e.address not in placed]
        cap = self.routing.max_replicas_per_avatar or len(healthy)
        if not others or len(reps) >= cap or self._over[model_id] < self.routing.spread_after:
            return None
        self._over.pop(model_id, None)
        chosen = self._least_loaded(model_id, others)
        self.placement[model_id] = [*placed, chosen.address]
        self._spread_at[model_id] = now
        self.stats.spreads += 1
        log.info("avatar %s spread to %s (%d replicas)", model_id, chosen.address, len(reps) + 1)
        return chosen

    def _count_call(self, model_id: str, chosen: Endpoint, hit: bool, now: float) -> None:
        """Book one call of `model_id` on `chosen`: in flight, the calling thread's
        replica, whether the avatar needs all its replicas, statistics."""
        n_reps = len(self.placement[model_id])
        if n_reps > 1:
            if len(self._affinity) > 100_000:  # threads come and go; forget them all
                self._affinity.clear()
            self._affinity[(threading.get_ident(), model_id)] = chosen.address
        self._model_inflight[model_id] += 1
        if self._model_inflight[model_id] > self.routing.spread_min_inflight * (n_reps - 1):
            self._hot_at[model_id] = now
        chosen.inflight += 1
        chosen.calls += 1
        self.stats.calls += 1
        self.stats.hits += hit
        self.stats.per_endpoint[chosen.address] += 1

    def release(self, model_id: str, ep: Endpoint) -> None:
        with self._lock:
            ep.inflight -= 1
            self._model_inflight[model_id] -= 1
            if self._model_inflight[model_id] <= 0:
                del self._model_inflight[model_id]

    def replicas_of(self, model_id: str) -> list[str]:
        with self._lock:
            return list(self.placement.get(model_id, []))

    def _forget(self, address: str) -> None:
        """Drop a dead replica from every placement."""
        with self._lock:
            for m in list(self.placement):
                reps = [a for a in self.placement[m] if a != address]
                if reps:
                    self.placement[m] = reps
                else:
                    del self.placement[m]

    def _is_dead(self, ep: Endpoint, exc: grpc.RpcError) -> bool:
        code = exc.code() if hasattr(exc, "code") else None
        if code in FAILOVER_CODES:
            return True
        return code in SUSPECT_CODES and not ep.client.healthy(self.endpoints.health_timeout_s)

    def _routed(self, model_id: str, fn: Callable[[InferenceClient], object]):  # type: ignore[no-untyped-def]
        """`fn(client)` on the replica for `model_id`, on another one if that one dies."""
        tried: set[str] = set()
        last: grpc.RpcError | None = None
        while True:
            try:
                ep = self.acquire(model_id, tried)
            except NoReplicaError:
                if last is not None:
                    raise last from None
                raise
            try:
                return fn(ep.client)
            except grpc.RpcError as exc:
                if not self._is_dead(ep, exc):
                    raise
                tried.add(ep.address)
                last = exc
                self.endpoints.mark_down(ep.address, f"{exc.code()} during a call")
                self._forget(ep.address)
                with self._lock:
                    self.stats.failovers += 1
                log.warning("inference call of %s failed over from %s", model_id, ep.address)
            finally:
                self.release(model_id, ep)

    # -- InferenceClient's interface ----------------------------------------------------
    def infer(self, call: InferCall) -> Mouths:
        return self._routed(call.model_id, lambda c: c.infer(call))

    def call(self, request: ipb.InferRequest, deadline: float | None = None) -> Mouths:
        return self._routed(request.model_id, lambda c: c.call(request, deadline))

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """Whether any replica is up (as of the last health check; if none was, checked
        again now)."""
        if self.endpoints.healthy():
            return True
        self.endpoints.check_health()
        return bool(self.endpoints.healthy())

    def _each(self, fn: Callable[[InferenceClient], object]) -> list[tuple[Endpoint, object]]:
        """`fn` on every healthy replica; raises only when every one failed."""
        out: list[tuple[Endpoint, object]] = []
        error: grpc.RpcError | None = None
        eps = self.endpoints.healthy()
        # all at once: the slowest replica's time, not the sum
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(eps)))) as pool:
            futures = [(ep, pool.submit(fn, ep.client)) for ep in eps]
            for ep, fut in futures:
                try:
                    out.append((ep, fut.result()))
                except grpc.RpcError as exc:
                    error = exc
        if not out:
            if error is not None:
                raise error
            raise NoReplicaError(f"no healthy inference replica at {self.address}")
        return out

    def list_models(self) -> common.ListModelsResponse:
        """Every replica's models; an avatar is loaded if any replica holds it."""
        answers = self._each(lambda c: c.list_models())
        self._adopt(
            {ep.address: {m.model_id for m in r.models if m.loaded} for ep, r in answers}  # type: ignore[attr-defined]
        )
        merged: dict[str, common.ModelInfo] = {}
        for _, resp in answers:
            for m in resp.models:  # type: ignore[attr-defined]
                have = merged.get(m.model_id)
                if have is None:
                    merged[m.model_id] = common.ModelInfo(model_id=m.model_id, loaded=m.loaded)
                elif m.loaded:
                    have.loaded = True
        return common.ListModelsResponse(models=[merged[k] for k in sorted(merged)])

    def load_model(self, model_id: str) -> common.LoadModelResponse:
        """Loads the avatar on the replica its calls will go to."""
        return self._routed(model_id, lambda c: c.load_model(model_id))

    def unload_model(self, model_id: str) -> common.UnloadModelResponse:
        """Unloads the avatar from every replica."""
        answers = self._each(lambda c: c.unload_model(model_id))
        with self._lock:
            self.placement.pop(model_id, None)
        ok = [r for _, r in answers if r.success]  # type: ignore[attr-defined]
        return ok[0] if ok else answers[0][1]  # type: ignore[return-value]

    def model_stats(
        self, model_id: str = "", timeout_s: float | None = None
    ) -> common.GetModelStatsResponse:
        """Every replica's statistics added up: counters and capacities sum, an avatar is
        loaded if any replica holds it."""
        answers = self._each(lambda c: c.model_stats(model_id, timeout_s))
        out = common.GetModelStatsResponse()
        merged: dict[str, common.ModelStats] = {}
        for _, resp in answers:
            r: common.GetModelStatsResponse = resp  # type: ignore[assignment]
            out.loaded_models += r.loaded_models
            out.max_models += r.max_models
            out.loaded_bytes += r.loaded_bytes
            out.max_bytes += r.max_bytes
            for s in r.stats:
                m = merged.setdefault(s.model_id, common.ModelStats(model_id=s.model_id))
                m.loaded = m.loaded or s.loaded
                m.request_count += s.request_count
                m.frame_count += s.frame_count
                m.total_inference_ms += s.total_inference_ms
                m.memory_bytes = max(m.memory_bytes, s.memory_bytes)
                m.last_used_unix = max(m.last_used_unix, s.last_used_unix)
                m.load_time_ms = max(m.load_time_ms, s.load_time_ms)
                m.execution_provider = m.execution_provider or s.execution_provider
                m.unet_precision = m.unet_precision or s.unet_precision
                m.precision_note = m.precision_note or s.precision_note
        for k in sorted(merged):
            m = merged[k]
            m.avg_ms_per_frame = m.total_inference_ms / m.frame_count if m.frame_count else 0.0
            out.stats.append(m)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.endpoints.close()

    # -- upkeep -------------------------------------------------------------------------
    def _adopt(self, held: dict[str, set[str]]) -> None:
        """Place avatars no replica was given by this router where replicas hold them."""
        by_model: dict[str, list[str]] = {}
        for address, models in held.items():
            for m in models:
                by_model.setdefault(m, []).append(address)
        with self._lock:
            for m, addresses in by_model.items():
                if m not in self.placement:
                    self.placement[m] = sorted(addresses, key=lambda a: -rendezvous_score(m, a))

    def draw_back(self, now: float | None = None) -> list[tuple[str, str]]:
        """Take the last-added replica from avatars that have not needed all of theirs for
        `cool_s`; returns the (avatar, replica) pairs drawn back."""
        now = time.monotonic() if now is None else now
        out: list[tuple[str, str]] = []
        with self._lock:
            for m, reps in self.placement.items():
                if len(reps) < 2:
                    continue
                quiet_since = max(self._hot_at.get(m, 0.0), self._spread_at.get(m, 0.0))
                if now - quiet_since < self.routing.cool_s:
                    continue
                out.append((m, reps.pop()))
                self._spread_at[m] = now  # one replica per cool_s
                self.stats.drawbacks += 1
        for m, address in out:
            log.info("avatar %s drawn back from %s", m, address)
            ep = self.endpoints.get(address)
            if self.routing.unload_on_drawback and ep is not None and ep.healthy:
                try:
                    ep.client.unload_model(m)
                except grpc.RpcError as exc:
                    log.warning("unloading %s from %s failed: %s", m, address, exc.code())
        return out

    def sync(self) -> None:
        """Adopt what the replicas say they hold (ListModels of each healthy one)."""
        held: dict[str, set[str]] = {}
        for ep in self.endpoints.healthy():
            try:
                models = ep.client.list_models().models
            except grpc.RpcError:
                continue
            held[ep.address] = {m.model_id for m in models if m.loaded}
        self._adopt(held)

    def _maintain(self) -> None:
        next_sync = 0.0
        while not self._stop.wait(1.0):
            try:
                self.draw_back()
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.routing.refresh_s
                    self.sync()
            except Exception:
                log.exception("router upkeep failed")


def connect_inference(
    cfg: Config, make_client: Callable[[str], InferenceClient]
) -> InferenceClient | RoutedInferenceClient:
    """The inference client `compositing.inference_address` asks for: `make_client(address)`
    for one `host:port`; a `RoutedInferenceClient` (over `make_client` per replica) for a
    comma-separated list or a `dns:///` name."""
    c = cfg.compositing
    if not is_multi_target(c.inference_address):
        return make_client(c.inference_address)
    return RoutedInferenceClient(
        c.inference_address,
        cfg.limits.max_message_bytes,
        c.inference_timeout_s,
        c.transfer_dtype,
        routing=c.routing,
        make_client=make_client,
    )
