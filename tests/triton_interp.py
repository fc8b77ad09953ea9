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


_COMPILE_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, {src!r})
import importlib
spec = json.loads({spec!r})
fn = triton.jit(getattr(importlib.import_module(spec["module"]), spec["kernel"]))
consts = spec["consts"]
sig = {{n: "constexpr" if n in consts else spec["types"].get(n, spec["ptr"] if n.endswith("_ptr") else "i32")
        for n in fn.arg_names}}
src = ASTSource(fn=fn, signature=sig, constexprs={{(fn.arg_names.index(n),): v for n, v in consts.items()}})
done = []
for warps, stages in spec["launch"]:
    cc = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32), options={{"num_warps": warps,
                                                                                  "num_stages": stages}})
    done.append({{"warps": warps, "stages": stages, "shared": cc.metadata.shared, "cubin": len(cc.asm["cubin"])}})
print("RESULT" + json.dumps(done))
"""


def compile_for_gpu(module: str, kernel: str, consts: dict, *, ptr: str = "*bf16", types: dict | None = None,
                    launch=((4, 2),), arch: int = 90) -> list[dict]:
    """Compile a kernel of `module` to a cubin for an sm_`arch` GPU, on this (GPU-less) machine.

    Triton's front end and ptxas run without a device, so a kernel that the interpreter accepts but
    the compiler refuses (a non-constexpr global, a dot below 16 wide, too much shared memory for a
    config) fails here on CPU. Pointer arguments (names ending in _ptr) get `ptr`, the others i32
    unless `types` names them; `launch` lists (num_warps, num_stages). Returns one record per launch.
    """
    spec = json.dumps({"module": module, "kernel": kernel, "consts": consts, "ptr": ptr, "types": types or {},
                       "launch": [list(x) for x in launch], "arch": arch})
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = _COMPILE_SCRIPT.format(src=src, spec=spec)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
