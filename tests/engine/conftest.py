"""Fixtures for the engine tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modelfleet.engine.builtin import materialize

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # engine_checkpoints.py sits beside this file
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return materialize()
