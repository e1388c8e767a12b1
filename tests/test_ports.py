"""Ports for local listeners: below the kernel's ephemeral range, free, and never handed out twice."""

from __future__ import annotations

import socket

from modelfleet import ports


def test_the_range_leaves_out_the_ephemeral_ports():
    assert ports.candidate_range((32768, 60999)) == range(20000, 30000)  # Linux' default
    assert ports.candidate_range((25000, 60999)) == range(20000, 25000)
    assert ports.candidate_range((1024, 24999)) == range(25000, 30000)
    assert ports.candidate_range((40000, 50000)) == range(20000, 30000)
    assert len(ports.candidate_range((1024, 65535))) == 0


def test_the_ephemeral_range_is_read_from_the_kernel_file(tmp_path):
    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t50000\n")
    assert ports.ephemeral_range(str(path)) == (40000, 50000)
    assert ports.ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)
    low, high = ports.ephemeral_range()
    assert 0 < low <= high < 65536


def test_ports_are_outside_the_ephemeral_range_bindable_and_distinct():
    low, high = ports.ephemeral_range()
    chosen = [ports.free_port() for _ in range(100)]
    assert len(set(chosen)) == len(chosen)
    for port in chosen:
        assert not low <= port <= high, port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_passed_over(monkeypatch):
    with socket.socket() as taken, socket.socket() as probe:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        probe.bind(("127.0.0.1", 0))
        busy, free = taken.getsockname()[1], probe.getsockname()[1]
        probe.close()  # free again: the one port of the two that free_port may give
        monkeypatch.setattr(ports, "candidate_range", lambda: [busy, free])
        monkeypatch.setattr(ports, "_given", set())
        assert ports.free_port() == free
        # both taken now (one listening, one handed out): the kernel picks one instead
        fallback = ports.free_port()
        assert fallback not in (busy, free)
