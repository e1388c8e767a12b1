"""Free TCP ports for the listeners modelfleet starts on a machine it shares.

A port found by binding port 0 comes from the kernel's ephemeral range, the same range every
outgoing connection takes its local port from; between the moment it is released and the moment
its listener binds it, any connection on the machine can take it (and Ray opens many). So ports
are drawn at random from below that range instead, above the ports Ray's workers use
(10002-19999) and below Kubernetes' NodePorts (30000-32767), and each is checked by binding it.
"""

from __future__ import annotations

import random
import socket
import threading

LOW = 20000
HIGH = 30000  # exclusive
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"

_rng = random.SystemRandom()  # a forked process must not repeat its parent's draws
_lock = threading.Lock()
_given: set[tuple[str, int]] = set()


def ephemeral_range(path: str = _EPHEMERAL_RANGE) -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux' default where unknown)."""
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def candidate_range(ephemeral: tuple[int, int] | None = None) -> range:
    """The ports `free_port` draws from: [LOW, HIGH) less any part the ephemeral range covers."""
    low, high = ephemeral or ephemeral_range()
    if high < LOW or low >= HIGH:
        return range(LOW, HIGH)
    if low > LOW:
        return range(LOW, low)
    return range(max(LOW, high + 1), HIGH)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` nothing listens on, outside the ephemeral range, and not handed out
    before by this process. Falls back to a kernel-chosen port when the range has none left."""
    ports = candidate_range()
    with _lock:
        for port in _rng.sample(ports, min(200, len(ports))):
            if (host, port) in _given or not _bindable(host, port):
                continue
            _given.add((host, port))
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
