"""TCP ports for services started by the launcher, the demo, tests and benchmarks."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "") -> bool:
    """Whether a TCP server could bind `port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_ports(*wanted: int) -> tuple[int, ...]:
    """The wanted ports, or free ones in place of those already taken; all distinct."""
    out: list[int] = []
    for port in wanted:
        while port in out or not port_free(port):
            port = free_port()
        out.append(port)
    return tuple(out)
