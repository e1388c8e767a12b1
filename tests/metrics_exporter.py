"""A settable /metrics endpoint on loopback: stands in for a Serve application's metrics page when
the thing under test is the autoscaler's reading of Prometheus, not the serving itself (the
serving tests scrape the real page)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MetricsExporter:
    def __init__(self) -> None:
        self.text = ""
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def set(
        self,
        namespace: str,
        name: str,
        queue: dict[str, float],
        running: dict[str, float] | None = None,
        held: dict[str, float] | None = None,
    ) -> None:
        """Per-replica queue depth and running requests, and per-ingress held requests, in the
        serving page's names and labels."""
        labels = f'model_deployment="{name}",namespace="{namespace}"'
        lines = ["# TYPE modelfleet_queue_depth gauge"]
        lines += [f'modelfleet_queue_depth{{{labels},replica="{r}"}} {v}' for r, v in queue.items()]
        lines.append("# TYPE modelfleet_running_requests gauge")
        running_series = (running or {}).items()
        lines += [f'modelfleet_running_requests{{{labels},replica="{r}"}} {v}' for r, v in running_series]
        lines.append("# TYPE modelfleet_ingress_waiting_requests gauge")
        held_series = (held or {}).items()
        name_ = "modelfleet_ingress_waiting_requests"
        lines += [f'{name_}{{{labels},replica="{r}"}} {v}' for r, v in held_series]
        self.text = "\n".join(lines) + "\n"

    def __enter__(self) -> MetricsExporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
