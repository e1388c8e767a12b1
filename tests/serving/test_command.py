"""`modelfleet serve -f examples/tiny.yaml`, as a user runs it: it prints the endpoint with
examples once the model is ready, serves the official client, keeps the engine on cores of its
own when asked (`--cpu-binding auto`), and Ctrl-C leaves no Ray or HAProxy process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from serving_support import eventually, per_replica

from modelfleet.cpus import plan_cpus
from modelfleet.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _haproxy_configs() -> set[str]:
    """The config files of the HAProxy processes running now (one per Serve instance)."""
    configs = set()
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if args and args[0].endswith(b"haproxy") and b"-f" in args[:-1]:
            configs.add(args[args.index(b"-f") + 1].decode(errors="replace"))
    return configs


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
                except OSError:
                    continue
                found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")
                frontier.append(pid)
    return found


def _check_cpu_binding(proc: subprocess.Popen, banner: str, binding: str) -> None:
    """By default every process of the instance may run on every CPU. With `--cpu-binding
    auto` on 2+ CPUs the engine process (every thread of it) has cores of its own and every
    other process (the command, Ray's, HAProxy) keeps to the rest; on one CPU, no split."""
    mine = os.sched_getaffinity(0)
    plan = plan_cpus(mine) if binding == "auto" else None
    processes = _descendants(proc.pid)
    engines = [pid for pid, cmd in processes.items() if "modelfleet.engine.process" in cmd]
    assert len(engines) == 1, processes
    others = {pid: cmd for pid, cmd in processes.items() if pid not in engines}
    assert any("ServeReplica" in cmd for cmd in others.values()), others
    engine_cpus, serving_cpus = (set(plan.engine), set(plan.serving)) if plan else (mine, mine)
    if binding == "off":
        assert "cpus " not in banner
    elif plan is None:  # one CPU: nothing to split, and the banner says why
        assert "cpus      shared (--cpu-binding auto: 1 CPU(s)" in banner
    else:
        assert f"cpus      {plan.describe()}" in banner
    for task in Path(f"/proc/{engines[0]}/task").iterdir():  # torch's threads too
        assert os.sched_getaffinity(int(task.name)) == engine_cpus
    for pid, cmd in [(proc.pid, "modelfleet serve"), *others.items()]:
        with contextlib.suppress(ProcessLookupError):
            assert os.sched_getaffinity(pid) == serving_cpus, cmd


def _dropped_stream_stops_generating(base: str) -> None:
    """A client that drops a long stream mid-way through HAProxy: the API counts a 499 and the
    engine stops (no more tokens generated)."""
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 1800, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{base}/v1/completions", json=body) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 8:
                break  # leaving the block closes the connection

    def tokens() -> float:
        page = httpx.get(f"{base}/metrics", timeout=10).text
        return sum(per_replica(page, "modelfleet_generation_tokens_total").values())

    def settled() -> float | None:
        before = tokens()
        time.sleep(2.5)  # metrics are pushed once a second
        return before if tokens() == before else None

    eventually(lambda: 'status="499"' in httpx.get(f"{base}/metrics", timeout=10).text, 30)
    # Left running, the request would make all its tokens and stop there.
    assert eventually(settled, 30) < 1800


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    @property
    def banner(self) -> str:
        return "".join(self.out)


@contextlib.contextmanager
def modelfleet_serve(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """`modelfleet serve -f examples/tiny.yaml ARGS` until it prints its banner; on leaving, killed
    if it is still running (a test that checks Ctrl-C sends it itself)."""
    port = free_port()
    command = [sys.executable, "-m", "modelfleet.cli", "serve", "-f", "examples/tiny.yaml"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    served = Served(proc, port)
    readers = [
        threading.Thread(target=lambda: served.out.extend(proc.stdout), daemon=True),
        threading.Thread(target=lambda: served.err.extend(proc.stderr), daemon=True),
    ]
    for r in readers:
        r.start()
    try:
        eventually(lambda: "Press Ctrl-C" in served.banner or proc.poll() is not None, 240)
        assert proc.poll() is None, "".join(served.err)[-3000:]
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for r in readers:
            r.join(10)


def _fresh_env(ray_tmp: str) -> dict[str, str]:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}  # short: Ray puts sockets under it
    env.pop("MODELFLEET_API_KEY", None)
    return env


@pytest.mark.parametrize(("binding", "ingress"), [("off", "auto"), ("auto", "auto"), ("off", "separate")])
def test_serve_tiny_manifest_then_ctrl_c(binding, ingress):
    haproxy_before = _haproxy_configs()  # this session's own Serve instance runs one
    ray_tmp = tempfile.mkdtemp(prefix="mf", dir="/tmp")
    args = ([] if binding == "off" else ["--cpu-binding", binding]) + (
        [] if ingress == "auto" else ["--ingress", ingress]
    )
    with modelfleet_serve(*args, env=_fresh_env(ray_tmp)) as served:
        port, banner = served.port, served.banner
        assert f"http://127.0.0.1:{port}/v1" in banner
        assert "curl " in banner and "from openai import OpenAI" in banner
        # ray[serve] brings an HAProxy binary on Linux, so `auto` puts HAProxy on the port.
        assert "proxy     HAProxy" in banner
        # By default the model replicas serve the API themselves (the manifest has a replica).
        where = "to the ingress" if ingress == "separate" else "to the model replicas"
        assert where in banner, banner
        assert _haproxy_configs() - haproxy_before, "no HAProxy process of its own"
        _check_cpu_binding(served.proc, banner, binding)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        assert chat.choices[0].message.content
        stream = client.completions.create(
            model="tiny", prompt="Once", max_tokens=6, stream=True, extra_body={"ignore_eos": True}
        )
        texts = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
        assert len(texts) >= 2  # chunk by chunk through HAProxy
        _dropped_stream_stops_generating(f"http://127.0.0.1:{port}")
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=120) == 0
    assert "Shutting down" in "".join(served.err)
    deadline = time.monotonic() + 30
    while _processes_mentioning(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(ray_tmp) == []
    assert _haproxy_configs() <= haproxy_before, "HAProxy left running"


def test_replicas_serving_the_api_enforce_the_key_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    ray_tmp = tempfile.mkdtemp(prefix="mf", dir="/tmp")
    with modelfleet_serve("--api-key-file", str(key_file), env=_fresh_env(ray_tmp)) as served:
        assert "to the model replicas" in served.banner
        base = f"http://127.0.0.1:{served.port}"
        resp = httpx.get(f"{base}/v1/models", timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="tiny", prompt="Hi", max_tokens=2)
        right = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret-key", max_retries=0)
        assert right.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
        for open_path in ("/health", "/ready", "/metrics"):  # no key needed
            assert httpx.get(f"{base}{open_path}", timeout=30).status_code == 200
