"""Fast paths around the per-step transformer call: torch.compile and CUDA-graph replay.

A pipeline's model function calls the transformer once per solver step (the CFG pair as one batched
call); solvers, guidance and schedules stay eager Python around that call. Two opt-in fast paths
wrap it:

- **torch.compile** (`compile_module`): one graph (``fullgraph=True``, so a graph break is an error,
  not a silent slowdown) for static shapes (``dynamic=False``: each new image size / batch compiles
  once more). The first call at a new shape is slow; `first_call_timer` logs how slow.
- **CUDA graphs** (`CUDAGraphRunner`, `CUDAGraphCache`): at a fixed (batch, size) every step launches
  the same kernels, and for short steps (1024 px, Sprint) launching them from Python is a visible share
  of the step. The runner records one call and replays it: new inputs are copied into static buffers
  the graph reads, the graph is replayed, and its output (memory the graph owns and overwrites on the
  next replay) is cloned for the caller.

What a captured call may do: no host synchronisation (``.item()``, ``bool(tensor)``, data-dependent
shapes), and every tensor it reads that changes between calls must be one of its inputs. Anything
else it reads -- weights, tensors held by Python objects -- is baked into the graph by address, so
moving or replacing weights needs a new capture (`CUDAGraphCache.clear`, or a new signature).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import torch

from ..errors import ConfigError, InputError, SanaflowError, unknown_choice

logger = logging.getLogger(__name__)

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Compile modes that capture CUDA graphs themselves (torch's cudagraph trees).
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# Calls before capture: the first compiles / autotunes kernels and picks cuBLAS/cuDNN algorithms, the
# second runs with everything settled, so nothing of that happens during capture.
GRAPH_WARMUP_CALLS = 2

TensorInputs = Mapping[str, "torch.Tensor | None"]


def compile_module(module: torch.nn.Module, mode: str | None = None, backend: str = "inductor",
                   regional: bool = False) -> Callable:
    """`torch.compile(module)` as sanaflow's models are written for it: one graph, static shapes.

    `regional=True` compiles each of the module's repeated blocks (``transformer_blocks``) instead,
    one graph that all blocks share (two in CUDA inference, where each block hands its last residual
    add to the next and the first block is given none: `SanaTransformer.forward`), and leaves the
    rest eager: seconds to compile instead of a minute for the 600M / 1600M transformers, the same
    step time at 4096 px and under CUDA graphs (`benchmarks/bench_sana.py`, ``*-regional`` impls);
    without CUDA graphs the per-block calls cost host time at 1024 px. Returns a callable module
    that shares `module`'s weights; `module` itself stays uncompiled.
    """
    if mode not in COMPILE_MODES:
        raise unknown_choice("compile mode", str(mode), [str(m) for m in COMPILE_MODES])
    if mode is not None and backend != "inductor":
        raise ConfigError(f"compile mode {mode!r} is an inductor option; backend {backend!r} takes mode=None")
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": backend}
    if mode is not None:
        kwargs["mode"] = mode
    from ..ops import preload_kernels

    preload_kernels()  # the kernels' lazy imports happen here, not inside the traced graph
    if not regional:
        return torch.compile(module, **kwargs)
    blocks = getattr(module, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"regional compilation needs a model with transformer_blocks; "
                          f"{type(module).__name__} has none (compile it whole)")
    # A shallow copy whose block list holds the compiled blocks: the same parameters and buffers,
    # the original module untouched.
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._modules["transformer_blocks"] = torch.nn.ModuleList(torch.compile(b, **kwargs) for b in blocks)
    return clone


def shape_key(inputs: TensorInputs) -> tuple:
    """What a compiled graph or a CUDA graph is specialised on: each input's name, shape, dtype, device."""
    return tuple(
        (name, None if v is None else (tuple(v.shape), v.dtype, v.device)) for name, v in sorted(inputs.items())
    )


@contextlib.contextmanager
def first_call_timer(seen: set, key: Hashable, what: str, device: torch.device) -> Iterator[None]:
    """Log the duration of the first call at each `key` (when torch.compile compiles); later calls pass through."""
    if key in seen:
        yield
        return
    logger.info("%s: first call at this shape, compiling (this can take a minute or more)", what)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the call only queued its kernels
    seen.add(key)
    logger.info("%s: compiled in %.1f s; later calls at this shape reuse it", what, time.perf_counter() - start)


class CUDAGraphRunner:
    """One call of `fn(**inputs)` captured as a CUDA graph for fixed input shapes; call it to replay.

    `inputs` are tensors (all on one CUDA device) or None, by keyword; `fn` must return one tensor.
    Each call copies its inputs into the static buffers, replays, and returns a clone of the output.
    """

    device_type = "cuda"  # (a CPU stand-in for tests overrides this, `_capture` and `_replay`)

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: TensorInputs, warmup: int = GRAPH_WARMUP_CALLS):
        tensors = [v for v in inputs.values() if v is not None]
        devices = {v.device for v in tensors}
        if not tensors or len(devices) != 1 or next(iter(devices)).type != self.device_type:
            raise SanaflowError(
                f"CUDA graphs need tensor inputs on one CUDA device; got devices {sorted(map(str, devices))}"
            )
        self.device = next(iter(devices))
        self.key = shape_key(inputs)
        self.fn = fn
        # Contiguous copies: the graph reads these addresses at every replay.
        self._static = {
            k: None if v is None else v.detach().clone(memory_format=torch.contiguous_format) for k, v in inputs.items()
        }
        out = self._capture(max(1, warmup))
        if not isinstance(out, torch.Tensor):
            raise SanaflowError(f"a CUDA-graphed call must return one tensor, got {type(out).__name__}")
        self._out = out

    def _capture(self, warmup: int) -> torch.Tensor:
        """Warm up, then capture `fn` on the static buffers; returns the graph's output tensor."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            # Warm up on a side stream (as torch's docs prescribe): lazy initialisation, compilation,
            # autotuning and algorithm selection all synchronise, which capture does not allow.
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.fn(**self._static)
            current.wait_stream(side)
            torch.cuda.synchronize(self.device)
            try:
                with torch.cuda.graph(self.graph):
                    return self.fn(**self._static)
            except RuntimeError as e:
                raise SanaflowError(
                    f"CUDA graph capture failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    "the call synchronises with the host or changes shape; run without cuda_graphs"
                ) from e

    def _replay(self) -> None:
        self.graph.replay()

    def __call__(self, **inputs: torch.Tensor | None) -> torch.Tensor:
        """Copy `inputs` into the static buffers, replay the graph, return a copy of its output."""
        key = shape_key(inputs)
        if key != self.key:
            raise InputError(f"this CUDA graph was captured for inputs {self.key}; got {key}")
        for name, value in inputs.items():
            if value is not None:
                self._static[name].copy_(value)
        self._replay()
        return self._out.clone()  # the next replay overwrites self._out


class CUDAGraphCache:
    """Captured runners by (signature, input shapes), most recent `max_graphs` kept.

    Each graph keeps its own memory pool (the activations of one call) while it is cached, hence the
    small limit. `signature` must name everything that changes what the call computes but is not an
    input (weights, attention processors): a runner replays the kernels of its first call only.
    """

    def __init__(self, max_graphs: int = 2, runner: type[CUDAGraphRunner] | None = None):
        if max_graphs < 1:
            raise ConfigError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.runner = CUDAGraphRunner if runner is None else runner
        self._runners: OrderedDict[Hashable, CUDAGraphRunner] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runners)

    def clear(self) -> None:
        """Drop every captured graph (and its memory pool)."""
        self._runners.clear()

    def run(self, signature: Hashable, fn: Callable[..., torch.Tensor], **inputs: torch.Tensor | None) -> torch.Tensor:
        """Replay the graph of (signature, input shapes), capturing `fn` first if there is none yet."""
        key = (signature, shape_key(inputs))
        runner = self._runners.get(key)
        if runner is not None:
            self._runners.move_to_end(key)
            return runner(**inputs)
        while len(self._runners) >= self.max_graphs:
            self._runners.popitem(last=False)  # free the oldest pool before capturing a new one
        start = time.perf_counter()
        runner = self.runner(fn, inputs)
        logger.info("captured a CUDA graph for %s in %.1f s", _describe(inputs), time.perf_counter() - start)
        self._runners[key] = runner
        return runner(**inputs)


def _describe(inputs: TensorInputs) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if v is not None)
