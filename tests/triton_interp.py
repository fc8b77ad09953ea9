"""Run a test script in a subprocess with Triton's CPU interpreter on (it must be set before import)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None


def run_interpreted(script: str) -> dict:
    """Run `script` with TRITON_INTERPRET=1 and return the JSON it prints after 'RESULT'."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def interpreter_fixture(script: str):
    """A module-scoped fixture running `script` once in the interpreter (skipped without triton)."""

    @pytest.fixture(scope="module")
    def interpreter_results() -> dict:
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        return run_interpreted(script)

    return interpreter_results
