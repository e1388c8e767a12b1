"""One local Ray + Serve instance for the whole serving tier, with three applications on
one HTTP port (each under its own route prefix), deployed together so their models load
side by side:

- main:  builtin tiny-llama, TP 1: the API surface, streaming, errors, concurrency.
- small: builtin tiny-llama with one sequence slot, a queue of one and steps of at least
         10 ms: 429, cancellation, and an injected engine fault.
- direct: as `small`, but its model replica serves the API itself (no ingress deployment).
- tp2:   a random-weight Hugging Face checkpoint at TP 2 on the CPU, behind an API key:
         greedy output against transformers, and key enforcement.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_support import API_KEY, App, Serving, eventually, write_hf_checkpoint

from modelfleet.ports import free_port


@pytest.fixture(scope="session")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    import ray
    from ray import serve

    from modelfleet.serving.app import build_application
    from modelfleet.serving.settings import API_KEY_ENV, ServeSettings, apply_serve_process_env

    os.environ.pop(API_KEY_ENV, None)  # replicas inherit it: only the tp2 app has a key
    apply_serve_process_env()  # as `modelfleet serve` runs them
    ckpt = tmp_path_factory.mktemp("hf-llama")
    write_hf_checkpoint(ckpt)
    # Logical CPUs: every replica bundle (1 + 1 + 2) fits; the two real cores are shared.
    ray.init(num_cpus=8, include_dashboard=False, namespace="modelfleet-tests", logging_level=logging.WARNING)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        one_slot = dict(
            model="builtin://tiny-llama",
            max_num_seqs=1,
            max_queue_depth=1,
            device="cpu",
            enable_fault_injection=True,
            # Steps of at least 10 ms: a long request holds the one slot for 15 s, on any
            # machine, while a test reads the queue off metrics pushed once a second (at
            # the tiny model's own speed, 1500 tokens can be done in under 2 s).
            emulated_step_s=0.01,
        )
        apps = {
            "main": ServeSettings(
                name="main", served_name="tiny", model="builtin://tiny-llama", max_num_seqs=32, device="cpu"
            ),
            "small": ServeSettings(name="small", **one_slot),
            "direct": ServeSettings(name="direct", ingress="replica", **one_slot),
            "tp2": ServeSettings(
                name="tp2",
                model=f"file://{ckpt}",
                tensor_parallel_size=2,
                max_num_seqs=8,
                device="cpu",
                require_api_key=True,
                api_key=API_KEY,
            ),
        }
        serve.run_many(
            [
                serve.RunTarget(
                    build_application(s), name=n, route_prefix=f"/{n}", external_scaler_enabled=True
                )
                for n, s in apps.items()
            ],
            wait_for_applications_running=True,
        )
        base = f"http://127.0.0.1:{port}"
        result = Serving(
            main=App("main", f"{base}/main", "tiny"),
            small=App("small", f"{base}/small", "small"),
            direct=App("direct", f"{base}/direct", "direct"),
            tp2=App("tp2", f"{base}/tp2", "tp2", api_key=API_KEY),
            checkpoint=ckpt,
        )
        for app in (result.main, result.small, result.direct, result.tp2):
            eventually(lambda app=app: httpx.get(f"{app.base}/ready", timeout=5).status_code == 200, 120)
        yield result
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
