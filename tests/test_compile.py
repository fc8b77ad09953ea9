"""Compile-friendliness and the opt-in fast/memory paths of the text-to-image pipeline, on CPU.

- SanaTransformer traces into ONE graph (no graph break) for the plain, Sprint (guidance + qk-norm),
  position-embedding and masked configurations.
- A pipeline compiled with a cheap backend (aot_eager) gives the same images as eager: CFG, PAG,
  Sprint, and the compiled DC-AE decoder; the first call at a new shape logs its compile time.
- CUDA graphs requested on CPU fail with a clear error (pipeline, CLI).
- Text-encoder offload: same images, and the encoder moves to the device to encode and back after.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sanaflow.errors import ConfigError, SanaflowError
from sanaflow.models import SanaTransformer
from sanaflow.pipelines.acceleration import CUDAGraphCache, CUDAGraphRunner, compile_module, shape_key
from tiny_sana import save_tiny_sana, save_tiny_sprint

KW = dict(height=32, width=64, num_inference_steps=2, output_type="pt", negative_prompt="blurry")
PROMPTS = ["a red star", "a blue circle"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_sana(tmp_path_factory.mktemp("compile") / "sana", sample_size=8)


def _tiny_transformer(**kw) -> SanaTransformer:
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
               num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
               caption_channels=16, mlp_ratio=2.5, sample_size=8, patch_size=1)
    cfg.update(kw)
    return SanaTransformer(**cfg).eval()


MASK = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
CONFIGS = {
    "plain": ({}, {}),
    "sprint": ({"guidance_embeds": True, "qk_norm": "rms_norm_across_heads"}, {"guidance": torch.tensor([0.45, 0.45])}),
    # sample_size 4 != the 8x8 latent grid: the position table is computed inside forward.
    "pe": ({"interpolation_scale": 1, "sample_size": 4}, {}),
    "masked": ({}, {"encoder_attention_mask": MASK}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformer_traces_into_one_graph(name):
    model_kw, call_kw = CONFIGS[name]
    model = _tiny_transformer(**model_kw)
    x = torch.randn(2, 4, 8, 8)  # (B, C, H, W)
    context = torch.randn(2, 8, 16)  # (B, L, caption_channels)
    t = torch.tensor([500.0, 20.0])  # (B,)
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(x, context, t, **call_kw)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1


def test_compiled_pipeline_matches_eager(tiny_folder, caplog):
    import sanaflow

    pipe = sanaflow.load_pipeline(tiny_folder, device="cpu")
    eager = pipe(PROMPTS, seed=[1, 2], guidance_scale=4.5, **KW).images
    eager_pag = pipe(PROMPTS, seed=[1, 2], guidance_scale=4.5, pag_scale=2.0, **KW).images
    assert not pipe.compiled
    pipe.compile(backend="aot_eager", decoder=True)
    assert pipe.compiled
    with caplog.at_level(logging.INFO, logger="sanaflow"):
        got = pipe(PROMPTS, seed=[1, 2], guidance_scale=4.5, **KW).images
    first = [r.getMessage() for r in caplog.records if "compiled in" in r.getMessage()]
    assert any(m.startswith("transformer: compiled in") for m in first), first
    assert any(m.startswith("DC-AE decoder: compiled in") for m in first), first
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sanaflow"):
        again = pipe(PROMPTS, seed=[1, 2], guidance_scale=4.5, **KW).images
    assert not [r for r in caplog.records if "compil" in r.getMessage()]  # same shapes: nothing recompiles
    assert torch.equal(again, got)

    # PAG: its processor selects rows with torch.where, so the perturbed pass compiles into one graph too.
    got_pag = pipe(PROMPTS, seed=[1, 2], guidance_scale=4.5, pag_scale=2.0, **KW).images
    torch.testing.assert_close(got_pag, eager_pag, rtol=0, atol=1e-6)
    assert (got_pag - got).abs().max() > 1e-4


def test_compiled_sprint_matches_eager(tmp_path):
    import sanaflow

    pipe = sanaflow.load_pipeline(save_tiny_sprint(tmp_path / "sprint"), device="cpu")
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=4.5, output_type="pt")
    eager = pipe("a red star", seed=5, **kw).images
    got = pipe.compile(backend="eager")("a red star", seed=5, **kw).images  # dynamo only: the cheap check
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)


def test_regional_compilation_shares_weights_and_leaves_the_model_alone():
    model = _tiny_transformer(num_layers=3)
    x, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 16), torch.tensor([500.0, 20.0])
    with torch.inference_mode():
        eager = model(x, context, t, encoder_attention_mask=MASK)
    compiled = compile_module(model, backend="eager", regional=True)
    assert compiled is not model
    blocks = list(compiled.transformer_blocks)
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in blocks)
    assert not any(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in model.transformer_blocks)
    # the same parameter tensors, not copies
    assert compiled.patch_embed is model.patch_embed
    assert all(b._orig_mod is o for b, o in zip(blocks, model.transformer_blocks))
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        got = compiled(x, context, t, encoder_attention_mask=MASK)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)
    # one graph for all three blocks: they share the code and differ only in their (input) weights
    assert counters["stats"]["unique_graphs"] - before == 1
    with pytest.raises(ConfigError, match="transformer_blocks"):
        compile_module(torch.nn.Linear(2, 2), backend="eager", regional=True)


def test_regionally_compiled_pipeline_matches_eager(tiny_folder):
    import sanaflow

    pipe = sanaflow.load_pipeline(tiny_folder, device="cpu")
    eager = pipe(PROMPTS, seed=[1, 2], guidance_scale=4.5, **KW).images
    got = pipe.compile(backend="aot_eager", regional=True)(PROMPTS, seed=[1, 2], guidance_scale=4.5, **KW).images
    assert pipe.compiled
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)


def test_compile_options_are_checked(tiny_folder):
    import sanaflow

    with pytest.raises(ConfigError, match="compile mode"):
        compile_module(torch.nn.Linear(2, 2), mode="fastest")
    with pytest.raises(ConfigError, match="inductor option"):
        compile_module(torch.nn.Linear(2, 2), mode="max-autotune", backend="aot_eager")
    pipe = sanaflow.load_pipeline(tiny_folder, device="cpu")
    with pytest.raises(ConfigError, match="compile mode"):
        pipe.compile(mode="turbo")


def test_cuda_graphs_refused_on_cpu(tiny_folder, tmp_path, capsys):
    import sanaflow
    from sanaflow.cli import main

    pipe = sanaflow.load_pipeline(tiny_folder, device="cpu")
    with pytest.raises(SanaflowError, match="CUDA graphs need a CUDA device"):
        pipe.cuda_graphs = True
    assert not pipe.cuda_graphs
    with pytest.raises(SanaflowError, match="CUDA graphs need a CUDA device"):
        sanaflow.load_pipeline(tiny_folder, device="cpu", cuda_graphs=True)
    with pytest.raises(SanaflowError, match="one CUDA device"):
        CUDAGraphRunner(lambda x: x + 1, {"x": torch.zeros(2)})
    with pytest.raises(ConfigError):
        CUDAGraphCache(max_graphs=0)

    out = tmp_path / "out"
    rc = main(["generate", "a cat", "--model", str(tiny_folder), "--size", "32x32", "--steps", "1",
               "--device", "cpu", "--cuda-graphs", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert err == "sanaflow: error: --cuda-graphs needs a CUDA device; this run uses cpu"
    assert not out.exists() or not list(out.iterdir())


class ReplayOnCPU(CUDAGraphRunner):
    """A CPU stand-in for a CUDA graph: "replay" reruns the captured call on the static buffers.

    It checks the pipeline's wiring of the graph path (inputs copied into static buffers, keys,
    cache reuse across calls, output copies); the real capture is tested in test_cuda_graphs.py.
    """

    device_type = "cpu"

    def _capture(self, warmup):
        return self.fn(**self._static)

    def _replay(self):
        self._out.copy_(self.fn(**self._static))


@pytest.mark.parametrize("guidance,pag", [(1.0, 0.0), (4.5, 0.0), (4.5, 2.0)])
def test_graph_path_wiring_on_cpu(tiny_folder, guidance, pag):
    import sanaflow

    pipe = sanaflow.load_pipeline(tiny_folder, device="cpu")
    kw = dict(KW, seed=[1, 2], guidance_scale=guidance, pag_scale=pag)
    eager = pipe(PROMPTS, **kw).images
    pipe._graphs = CUDAGraphCache(runner=ReplayOnCPU)
    pipe._cuda_graphs = True  # (the public setter refuses CPU pipelines)
    first = pipe(PROMPTS, **kw).images
    second = pipe(PROMPTS, **kw).images  # replays the runner captured by the first call
    assert len(pipe._graphs) == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_shape_key_names_shapes_dtypes_and_missing_inputs():
    a = shape_key({"x": torch.zeros(2, 3), "mask": None})
    assert a == (("mask", None), ("x", ((2, 3), torch.float32, torch.device("cpu"))))
    assert a != shape_key({"x": torch.zeros(2, 4), "mask": None})
    assert a != shape_key({"x": torch.zeros(2, 3, dtype=torch.float16), "mask": None})
    assert a != shape_key({"x": torch.zeros(2, 3), "mask": torch.zeros(2)})


class RecordingEncoder:
    """Wraps a text encoder; records where it is moved and where it sits when asked to encode.

    Moves are only recorded (the wrapped model stays on the CPU), so a CPU test can use a distinct
    offload device ("meta") and still check the state changes.
    """

    def __init__(self, inner):
        self.inner = inner
        self.where = torch.device("cpu")
        self.events: list[str] = []
        self.fail = False

    def to(self, device=None, dtype=None):
        self.where = torch.device(device)
        self.events.append(f"to {self.where.type}")
        return self

    def encode(self, prompts, use_instruction=True, device=None, dtype=None):
        self.events.append(f"encode on {self.where.type}")
        if self.fail:
            raise SanaflowError("encoder failed")
        return self.inner.encode(prompts, use_instruction=use_instruction, device=device, dtype=dtype)


def test_offload_text_encoder_moves_it_and_keeps_images(tiny_folder):
    import sanaflow

    pipe = sanaflow.load_pipeline(tiny_folder, device="cpu")
    plain = pipe(PROMPTS, seed=[3, 4], **KW).images

    # The real encoder: identical images, and it stays on the offload device (the CPU) afterwards.
    offloaded = sanaflow.load_pipeline(tiny_folder, device="cpu", offload_text_encoder=True)
    assert offloaded.offload_text_encoder
    assert torch.equal(offloaded(PROMPTS, seed=[3, 4], **KW).images, plain)
    assert offloaded.text_encoder.device == torch.device("cpu")

    # The state changes, with a distinct offload device.
    rec = RecordingEncoder(pipe.text_encoder)
    pipe.text_encoder = rec
    pipe.offload_device = torch.device("meta")
    pipe.offload_text_encoder = True
    assert rec.events == ["to meta"]
    for _ in range(2):  # back to the device on every call, parked again afterwards
        rec.events.clear()
        got = pipe(PROMPTS, seed=[3, 4], **KW).images
        assert rec.events == ["to cpu", "encode on cpu", "encode on cpu", "to meta"]
        assert torch.equal(got, plain)
    # A call that fails while encoding parks it as well.
    rec.events.clear()
    rec.fail = True
    with pytest.raises(SanaflowError, match="encoder failed"):
        pipe(PROMPTS, seed=[3, 4], **KW)
    assert rec.events == ["to cpu", "encode on cpu", "to meta"]
    rec.fail = False
    pipe.offload_text_encoder = False
    assert rec.where == pipe.device
    rec.events.clear()
    pipe(PROMPTS, seed=[3, 4], **KW)
    assert rec.events == ["encode on cpu", "encode on cpu"]


def test_cli_flags_reach_the_config(tiny_folder, tmp_path):
    from sanaflow.cli import build_parser, main
    from sanaflow.commands.generate import resolve_config

    parser = build_parser()
    cfg = resolve_config(parser.parse_args(["generate", "x"]))
    assert (cfg.compile, cfg.cuda_graphs, cfg.offload_text_encoder) == (False, False, False)
    cfg = resolve_config(parser.parse_args(["generate", "x", "--compile", "--cuda-graphs", "--offload"]))
    assert (cfg.compile, cfg.cuda_graphs, cfg.offload_text_encoder) == (True, True, True)
    cfg = resolve_config(parser.parse_args(["generate", "x", "--set", "offload_text_encoder=true"]))
    assert cfg.offload_text_encoder and not cfg.compile
    cfg = resolve_config(parser.parse_args(["generate", "x", "--compile-regional"]))
    assert cfg.compile_regional and not cfg.compile

    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(tiny_folder), "--size", "32x32", "--steps", "1",
                 "--device", "cpu", "--offload", "--seed", "1", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
    assert "offload_text_encoder: true" in (out / "config.yaml").read_text()
