"""The `modelfleet` command as a user runs it: validate, crd, reference, --version, --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from manifest_cases import EXAMPLES, INVALID_CASES

import modelfleet
from modelfleet.api.crd import CRD_FILE

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "modelfleet"
    assert script.exists(), "pip install -e . installs the `modelfleet` command"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and modelfleet.__version__ in out.stdout


def test_validate_examples():
    out = run("validate", *(a for p in EXAMPLES for a in ("-f", str(p))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("valid ModelDeployment") == len(EXAMPLES) >= 3


def test_validate_reports_every_invalid_file_with_its_field(tmp_path):
    args = []
    for case in INVALID_CASES:
        path = tmp_path / f"{case.name}.yaml"
        path.write_text(yaml.safe_dump(case.manifest))
        args += ["-f", str(path)]
    out = run("validate", *args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    for case in INVALID_CASES:
        lines = [
            line for line in out.stderr.splitlines() if line.startswith(str(tmp_path / case.name) + ".yaml:")
        ]
        assert lines, f"no error printed for {case.name}"
        assert any(case.field in line for line in lines), lines
    assert f"{len(INVALID_CASES)} of {len(INVALID_CASES)} files invalid" in out.stderr


def test_one_bad_file_among_good_ones_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "examples/tiny.yaml").read_text().replace("tensorParallelSize: 1", "tensorParallelSize: 0")
    )
    out = run("validate", "-f", "examples/tiny.yaml", "-f", str(bad))
    assert out.returncode == 1
    assert "examples/tiny.yaml: valid" in out.stdout
    assert f"{bad}: spec.engine.tensorParallelSize" in out.stderr


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("spec: [unclosed\n", "not valid YAML at line"),
        ("", "empty file"),
        ("# only a comment\n", "empty file"),
        ("a: 1\n---\nb: 2\n", "holds 2 YAML documents"),
        ("- a\n- b\n", "expected a ModelDeployment mapping"),
        ("\tkey: value\n", "not valid YAML"),
    ],
)
def test_unreadable_files_give_one_clear_line(tmp_path, content, words):
    path = tmp_path / "m.yaml"
    path.write_text(content)
    out = run("validate", "-f", str(path))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    first = out.stderr.splitlines()[0]
    assert first.startswith(f"{path}: ") and words in first


def test_missing_file(tmp_path):
    out = run("validate", "-f", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1
    assert f"{tmp_path / 'nope.yaml'}: no such file" in out.stderr
    assert "Traceback" not in out.stderr


def test_crd_command_prints_the_committed_crd():
    out = run("crd")
    assert out.returncode == 0
    assert out.stdout == (ROOT / CRD_FILE).read_text()


def test_reference_command():
    out = run("reference")
    assert out.returncode == 0 and "`spec.engine.tensorParallelSize`" in out.stdout


@pytest.mark.parametrize("command", [[], ["validate"], ["crd"], ["reference"]])
def test_help(command):
    out = run(*command, "--help")
    assert out.returncode == 0
    assert "usage: modelfleet" in out.stdout


def test_no_command_prints_help():
    out = run()
    assert out.returncode == 2 and "COMMAND" in out.stdout


def test_serve_refuses_haproxy_without_a_binary_before_starting_anything(tmp_path):
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(tmp_path / "missing")}
    out = subprocess.run(
        [sys.executable, "-m", "modelfleet.cli", "serve", "-f", "examples/tiny.yaml", "--http-proxy=haproxy"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "Ray" not in out.stderr
    assert "no haproxy binary" in out.stderr and "--http-proxy ray" in out.stderr
