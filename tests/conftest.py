"""Shared test setup: the tests folder is importable (`import manifest_cases`) from every tier."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
