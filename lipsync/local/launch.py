"""Run both services as child processes, and the browser page's gateway:
`python -m lipsync.local.launch` (what `make run` does).

Ctrl-C or SIGTERM stops both. The launcher waits until each service answers the
standard gRPC health check before saying it is ready. `ServiceProcesses` is the same
thing as a context manager, used by the demo and the benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from types import TracebackType

from lipsync.config import load_config
from lipsync.local.replica_env import inference_address, replica_env, replica_ports
from lipsync.rpc.channel import wait_healthy
from lipsync.rpc.tls import channel_credentials_of

log = logging.getLogger("lipsync.launch")


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until `url` answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering after {timeout_s:.0f} s")
        time.sleep(0.1)


def stop_processes(procs: Iterable[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM every process still running (each drains as its grace allows), wait up to
    `timeout_s` for each, then kill those still there."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class ServiceProcesses:
    """Both services as child processes, stopped on exit."""

    def __init__(
        self,
        config: str | None = None,
        env: Mapping[str, str] | None = None,
        inference_port: int | None = None,
        compositing_port: int | None = None,
        quiet: bool = False,
        web_port: int | None = None,
        inference_replicas: int = 1,
    ):
        """`web_port`: also serve the browser page and its WebSocket gateway there.
        `inference_replicas`: that many inference services, one per GPU, on consecutive
        ports (lipsync/local/replica_env.py); the compositing service routes over them."""
        self.env = dict(os.environ if env is None else env)
        cfg = load_config(config, self.env)
        self.inference_port = inference_port or cfg.inference.port
        self.compositing_port = compositing_port or cfg.compositing.port
        self.inference_ports = replica_ports(cfg, inference_replicas, self.inference_port)
        self.replica_envs = [
            replica_env(self.env, cfg, i, len(self.inference_ports))
            for i in range(len(self.inference_ports))
        ]
        self.env["INFERENCE_ADDRESS"] = inference_address(self.inference_ports)
        # With TLS configured, the health checks connect as the compositing service and
        # the gateway do (docs/SECURITY.md).
        self.inference_tls = channel_credentials_of(cfg.compositing.inference_tls)
        self.compositing_tls = channel_credentials_of(cfg.web.compositing_tls)
        self.config = config
        self.quiet = quiet
        self.web_port = web_port
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"localhost:{self.compositing_port}"

    def _spawn(
        self, module: str, port: int, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        cmd = [sys.executable, "-m", module, "--port", str(port), *extra]
        if self.config:
            cmd += ["--config", self.config]
        out = subprocess.DEVNULL if self.quiet else None
        proc = subprocess.Popen(cmd, env=env or self.env, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def start(self, timeout_s: float = 120.0) -> ServiceProcesses:
        infs = [
            self._spawn("inference_service", p, env=e)
            for p, e in zip(self.inference_ports, self.replica_envs, strict=True)
        ]
        comp = self._spawn("compositing_service", self.compositing_port)
        try:
            for p, inf in zip(self.inference_ports, infs, strict=True):
                wait_healthy(f"localhost:{p}", timeout_s, inf, self.inference_tls)
            wait_healthy(self.address, timeout_s, comp, self.compositing_tls)
            if self.web_port:
                web = self._spawn("lipsync.web", self.web_port, "--server", self.address)
                wait_http(f"http://localhost:{self.web_port}/healthz", timeout_s, web)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_processes(self.procs, timeout_s)
        self.procs.clear()

    def __enter__(self) -> ServiceProcesses:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lipsync.local.launch", description=__doc__)
    ap.add_argument("--config", help="YAML config file (default: $LIPSYNC_CONFIG)")
    ap.add_argument("--no-web", action="store_true", help="do not serve the browser page")
    ap.add_argument(
        "--inference-replicas",
        type=int,
        default=1,
        metavar="N",
        help="run N inference services, one per GPU (device_id + i, port + i), "
        "routed by avatar (docs/SCALING.md)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    web_port = None if args.no_web else load_config(args.config).web.port
    services = ServiceProcesses(
        args.config, web_port=web_port, inference_replicas=args.inference_replicas
    )
    t0 = time.perf_counter()
    try:
        services.start()
    except (RuntimeError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    log.info(
        "ready in %.1f s: clients connect to %s (inference on localhost:%d); Ctrl-C stops",
        time.perf_counter() - t0,
        services.address,
        services.inference_port,
    )
    try:
        while not stop.is_set():
            if any(p.poll() is not None for p in services.procs):
                log.error("a service exited; stopping the other")
                return 1
            stop.wait(0.5)
    finally:
        services.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
