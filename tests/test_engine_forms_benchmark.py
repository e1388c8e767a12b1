"""benchmarks/engine_forms.py: each form runs every request to its end, and the ratios it
reports are those of the rounds it ran."""

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the benchmarks share serve_load's prompts, whose module needs aiohttp")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_forms.py"
_spec = importlib.util.spec_from_file_location("engine_forms", _PATH)
engine_forms = importlib.util.module_from_spec(_spec)
sys.modules["engine_forms"] = engine_forms
_spec.loader.exec_module(engine_forms)


def test_every_form_runs_every_request_and_the_ratios_are_the_rounds():
    import torch

    args = argparse.Namespace(
        model_uri="builtin://tiny-llama",
        streams=2,
        requests_per_stream=3,
        max_tokens=5,
        gap_ms=2.0,
        jitter_ms=3.0,
        rounds=2,
        max_num_seqs=4,
        engine_threads=1,
    )
    before = torch.get_num_threads()
    try:
        out = asyncio.run(engine_forms.run(args))
    finally:
        torch.set_num_threads(before)  # the thread form sets this process' count
    assert out["requests"] == 6
    forms = ("thread", "process", "process+gap", "process+jitter")
    assert out["tokens_each_run"] == {name: [6 * 5] for name in forms}
    assert set(out["tok_s"]) == set(forms)
    assert all(v > 0 for v in out["tok_s"].values())
    for key in ("process_over_thread", "gap_over_no_gap", "jitter_over_no_gap"):
        each = sorted(out[f"{key}_each"])
        assert len(each) == 2
        assert each[0] <= out[key] <= each[1]  # the median of two lies between them
