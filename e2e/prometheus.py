"""A real Prometheus server (Debian's `prometheus` package) on loopback, for tests and benchmarks.

with PrometheusServer(targets=["127.0.0.1:8000"], scrape_interval="1s") as prom:
    prom.query("sum(modelfleet_queue_depth)")
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from e2e.cluster import free_port


class PrometheusMissing(RuntimeError):
    """The prometheus binary is not installed."""


def binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusMissing(
            "prometheus is not installed; on Debian: apt-get install --no-install-recommends prometheus"
        )
    return found


class PrometheusServer:
    """One Prometheus process scraping `targets` (host:port) at `metrics_path`."""

    def __init__(
        self,
        targets: list[str],
        scrape_interval: str = "1s",
        metrics_path: str = "/metrics",
        workdir: Path | None = None,
        listen_host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ):
        """`listen_host` and `prefix` (e.g. an `nsenter` into a node's network namespace) put it
        where pods reach it; by default it stays on loopback."""
        self.targets = targets
        self.listen_host = listen_host
        self.prefix = prefix or []
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="modelfleet-prometheus-"))
        self.port = free_port()
        self.url = f"http://{listen_host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [
                {
                    "job_name": "modelfleet",
                    "metrics_path": self.metrics_path,
                    "scrape_timeout": self.scrape_interval,
                    "honor_labels": True,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self, timeout: float = 30) -> PrometheusServer:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()))
        log = (self.dir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={self.listen_host}:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, now or at Unix time `at`."""
        params: dict[str, Any] = {"query": promql} if at is None else {"query": promql, "time": at}
        resp = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=5)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """`start` and `end` are Unix times; each series' `values` are (time, value) pairs."""
        params = {"query": promql, "start": start, "end": end, "step": step}
        resp = httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=30)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
