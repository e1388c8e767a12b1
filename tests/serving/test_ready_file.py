"""The replica's ready file: what the worker pod's readiness probe and preStop drain read."""

from __future__ import annotations

from modelfleet.serving.replica import mark_ready, unmark_ready


def test_ready_file_written_and_removed(tmp_path, monkeypatch):
    path = tmp_path / "run" / "replica-ready"
    monkeypatch.setenv("MODELFLEET_READY_FILE", str(path))
    written = mark_ready("r1")
    assert written == str(path) and path.read_text() == "r1\n"
    unmark_ready(written)
    assert not path.exists()
    unmark_ready(written)  # twice is fine: shutdown may run after a crash cleaned up


def test_no_ready_file_outside_a_worker_pod(monkeypatch):
    monkeypatch.delenv("MODELFLEET_READY_FILE", raising=False)
    assert mark_ready("r1") is None
