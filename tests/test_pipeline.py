"""Text-to-image pipeline: parity with diffusers' SanaPipeline on a tiny random model, seeds, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sanaflow.errors import SanaflowError
from tiny_sana import save_tiny_sana

STEPS = 4


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_sana(tmp_path_factory.mktemp("tiny") / "sana", sample_size=8)


@pytest.fixture(scope="module")
def binned_folder(tmp_path_factory):
    # A 32x DC-AE (6 stages, as SANA's) with sample_size 16: a 512px model, so both pipelines use the 512 bins.
    return save_tiny_sana(tmp_path_factory.mktemp("tiny16") / "sana", sample_size=16, seed=1, vae_stages=6)


@pytest.fixture(scope="module")
def ours(tiny_folder):
    import sanaflow

    return sanaflow.load_pipeline(tiny_folder, device="cpu")


@pytest.fixture(scope="module")
def ref(tiny_folder):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("prompts", [["a red star"], ["a red star above a blue square", "a photo of a cat"]])
@pytest.mark.parametrize("hw", [(32, 64), (64, 32)])
def test_parity_with_diffusers(ours, ref, guidance, prompts, hw):
    h, w = hw
    latents = torch.randn(len(prompts), 4, h // 4, w // 4, generator=torch.Generator().manual_seed(3))
    kw = dict(negative_prompt="blurry", height=h, width=w, num_inference_steps=STEPS, guidance_scale=guidance,
              latents=latents, output_type="pt", use_resolution_binning=False)
    expected = ref(prompts, **kw).images
    got = ours(prompts, **kw).images
    assert got.shape == expected.shape == (len(prompts), 3, h, w)
    assert (got - expected).abs().max().item() <= 1e-3


def test_parity_with_resolution_binning(binned_folder):
    from diffusers import SanaPipeline

    import sanaflow

    ref = SanaPipeline.from_pretrained(binned_folder)
    ref.set_progress_bar_config(disable=True)
    ours = sanaflow.load_pipeline(binned_folder, device="cpu")
    h, w = 96, 160  # ratio 0.6 -> generated at the 384x640 bin, then resized back
    latents = torch.randn(1, 4, 384 // 32, 640 // 32, generator=torch.Generator().manual_seed(0))
    kw = dict(height=h, width=w, num_inference_steps=2, guidance_scale=4.5, latents=latents, output_type="pt")
    expected = ref("a small red star", **kw).images
    got = ours("a small red star", **kw).images
    assert got.shape == (1, 3, h, w)
    assert (got - expected).abs().max().item() <= 1e-3


def test_seeds_are_reproducible_per_image(ours):
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="np")
    a = ours(["a red star", "a blue circle"], seed=[11, 12], **kw)
    b = ours(["a red star", "a blue circle"], seed=[11, 12], **kw)
    assert a.seeds == [11, 12]
    assert np.array_equal(a.images, b.images)
    alone = ours("a blue circle", seed=12, **kw).images[0]
    np.testing.assert_allclose(alone, a.images[1], atol=1e-5)
    other = ours("a blue circle", seed=13, **kw).images[0]
    assert np.abs(other - alone).max() > 1e-3


def test_output_types(ours):
    kw = dict(height=32, width=64, num_inference_steps=1, seed=0, guidance_scale=1.0)
    pil = ours("a cat", output_type="pil", **kw).images
    assert pil[0].size == (64, 32)
    pt = ours("a cat", output_type="pt", **kw).images
    assert pt.shape == (1, 3, 32, 64) and 0 <= pt.min() and pt.max() <= 1
    lat = ours("a cat", output_type="latent", **kw).images
    assert lat.shape == (1, 4, 8, 16)
    arr = np.asarray(pil[0]).astype(np.float32) / 255
    np.testing.assert_allclose(arr, pt[0].permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-6)


def test_num_images_per_prompt_orders_like_diffusers(ours):
    out = ours(["a cat", "a dog"], num_images_per_prompt=2, seed=0, height=32, width=32,
               num_inference_steps=1, output_type="np")
    assert out.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert out.seeds == [0, 1, 2, 3]


def test_pag_scale_zero_equals_cfg(ours):
    kw = dict(height=32, width=32, num_inference_steps=2, seed=4, output_type="pt", guidance_scale=4.5)
    plain = ours("a red star", **kw).images
    pag0 = ours("a red star", pag_scale=0.0, **kw).images
    pag = ours("a red star", pag_scale=2.0, **kw).images
    assert torch.equal(plain, pag0)
    assert (pag - plain).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=""), "empty prompt"),
        (dict(prompt=[]), "empty"),
        (dict(prompt="a cat", height=33, width=32), "multiple of 32"),
        (dict(prompt="a cat", height=8192, width=32), "limit"),
        (dict(prompt="a cat", sampler="heun9"), "sampler"),
        (dict(prompt="a cat", output_type="gif"), "output_type"),
        (dict(prompt="a cat", guidance_scale=float("nan")), "guidance_scale"),
        (dict(prompt="a cat", pag_scale=float("inf")), "pag_scale"),
        (dict(prompt=b"a cat"), "got bytes"),
        (dict(prompt="a cat", negative_prompt=None), "negative_prompt must be a string"),
        (dict(prompt=["a", "b"], negative_prompt=["x"], guidance_scale=1.0), "1 negative prompts for 2"),
        (dict(prompt="a cat", num_images_per_prompt=1.5), "num_images_per_prompt must be an int"),
        (dict(prompt="a cat", guidance_scale="4"), "guidance_scale must be a finite number"),
        (dict(prompt="a cat", seed=2**70), "seed must be an int"),
        (dict(prompt="a cat", seed="12"), "seed must be an int"),
        (dict(prompt="a cat", seed=1.5), "seed must be an int"),
        (dict(prompt="a cat", height=0), "height must be a positive int"),
        (dict(prompt="a cat", use_resolution_binning="no"), "use_resolution_binning"),
        (dict(prompt="a cat", pag_layers=[1.7]), "not block indices"),
        (dict(prompt="a cat", pag_layers=[100]), "not block indices"),
        (dict(prompt="a cat", flow_shift=float("nan")), "flow_shift"),
        (dict(prompt="a cat", sampler="scm"), "Sprint"),
        (dict(prompt="a cat", generator=5), "generator must be a torch.Generator"),
        (dict(prompt="a cat", height=32, width=32, latents=np.zeros((1, 4, 1, 1))), "latents must be a torch.Tensor"),
        (dict(prompt="a cat", height=32, width=32, latents=torch.full((1, 4, 1, 1), float("nan"))), "NaN"),
        (dict(prompt="a cat", height=32, width=32, latents=torch.zeros(1, 4, 1, 1, dtype=torch.int32)),
         "floating-point"),
        (dict(prompt="a cat", height=32, width=32, latents=torch.zeros(1, 4, 1, 1), seed=3), "not both"),
        (dict(prompt="a cat", height=32, width=32, latents=torch.zeros(1, 3, 8, 8)), "shape"),
    ],
)
def test_bad_input(ours, kwargs, match):
    with pytest.raises(SanaflowError, match=match):
        ours(num_inference_steps=1, **kwargs)


@pytest.mark.parametrize("steps", [1, 2])
def test_sprint_parity_with_diffusers(tmp_path, steps):
    from diffusers import SanaSprintPipeline

    import sanaflow
    from tiny_sana import save_tiny_sprint

    folder = save_tiny_sprint(tmp_path / "sprint", sample_size=8)
    ref = SanaSprintPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = sanaflow.load_pipeline(folder, device="cpu")
    assert ours.is_sprint
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(5))
    kw = dict(height=32, width=64, num_inference_steps=steps, guidance_scale=4.5, latents=latents,
              output_type="pt", use_resolution_binning=False)
    prompts = ["a red star", "a blue square"]
    ref_kw = {} if steps == 2 else {"intermediate_timesteps": None}  # diffusers refuses it otherwise
    expected = ref(prompts, generator=torch.Generator().manual_seed(0), **kw, **ref_kw).images
    got = ours(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    assert (got - expected).abs().max().item() <= 1e-3


def test_trim_caption_padding_keeps_the_columns_any_prompt_uses():
    from sanaflow.pipelines.text_to_image import trim_caption_padding

    h = torch.randn(2, 300, 8)
    m = torch.zeros(2, 300, dtype=torch.long)
    m[0, :20], m[1, :70] = 1, 1
    neg_h, neg_m = torch.randn(2, 300, 8), torch.zeros(2, 300, dtype=torch.long)
    neg_m[:, :3] = 1
    (ch, cm), (uh, um) = trim_caption_padding((h, m), (neg_h, neg_m))
    assert ch.shape == (2, 128, 8) and uh.shape == (2, 128, 8) and cm.shape == um.shape == (2, 128)  # 70 -> 128
    assert torch.equal(ch, h[:, :128]) and torch.equal(cm, m[:, :128]) and torch.equal(uh, neg_h[:, :128])
    assert int(cm.sum()) == int(m.sum())  # no valid token dropped
    (ch, _), none = trim_caption_padding((h, m), None, multiple=16)
    assert ch.shape[1] == 80 and none is None
    m[1, 290] = 1  # a prompt using the last columns: nothing to cut
    assert trim_caption_padding((h, m))[0][0].shape[1] == 300
    m[1] = 0  # a row with no valid token attends uniformly to all 300 columns: left alone
    assert trim_caption_padding((h, m))[0][0].shape[1] == 300


def test_trimmed_caption_gives_the_same_images(ours):
    seen = []
    hook = ours.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[1].shape[1]))
    kw = dict(negative_prompt="blurry", height=32, width=32, num_inference_steps=2, guidance_scale=4.5,
              seed=5, output_type="pt", use_resolution_binning=False)
    try:
        ours.trim_caption = False
        full = ours(["a red star", "a small blue circle"], **kw).images
        n_full = seen[-1]
        ours.trim_caption = True
        cut = ours(["a red star", "a small blue circle"], **kw).images
        n_cut = seen[-1]
    finally:
        ours.trim_caption = True
        hook.remove()
    assert n_cut < n_full, (n_cut, n_full)  # the caption did get shorter
    assert (cut - full).abs().max().item() <= 1e-5


def test_size_hint_stays_within_the_limit():
    from sanaflow.errors import InputError
    from sanaflow.pipelines.resolution import check_size

    with pytest.raises(InputError, match="try 4096"):
        check_size(4090, 64, 32, 4096)  # the nearest multiple above the limit is not offered
    with pytest.raises(InputError, match="try 96"):
        check_size(100, 64, 32, 4096)
    with pytest.raises(InputError, match="above the limit of 4096"):
        check_size(4120, 64, 32, 4096)  # checked before the multiple, whose hint would be 4128
    check_size(4096, 32, 32, 4096)


@pytest.mark.parametrize("edit, match", [
    (("model_index.json", "text_encoder", []), "should be \\[library, class\\]"),
    (("model_index.json", "text_encoder", ["x", 5]), "should be \\[library, class\\]"),
    (("vae/config.json", "scaling_factor", 0), "scaling_factor=0"),
])
def test_bad_component_entries_are_checkpoint_errors(tmp_path, edit, match):
    import json
    import shutil

    from sanaflow.errors import SanaflowError
    from sanaflow.hub import builtin_path
    from sanaflow.pipelines import TextToImagePipeline

    folder = tmp_path / "m"
    shutil.copytree(builtin_path("sanaflow/shapes-tiny"), folder)
    name, key, value = edit
    config = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps({**config, key: value}))
    with pytest.raises(SanaflowError, match=match):
        TextToImagePipeline.from_pretrained(folder)


def _with_our_models(ref, folder):
    # diffusers' own pipeline object, its transformer and DC-AE swapped for ours (loaded from the same folder)
    from sanaflow.models import DCAE, SanaTransformer

    pipe = type(ref)(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, scheduler=ref.scheduler,
                     vae=DCAE.from_pretrained(folder, subfolder="vae"),
                     transformer=SanaTransformer.from_pretrained(folder, subfolder="transformer"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_our_models_run_inside_diffusers_sana_pipeline(tiny_folder, ref):
    pipe = _with_our_models(ref, tiny_folder)
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(negative_prompt="blurry", height=32, width=64, num_inference_steps=STEPS, guidance_scale=4.5,
              latents=latents, output_type="pt", use_resolution_binning=False)
    prompts = ["a red star above a blue square", "a photo of a cat"]
    expected = ref(prompts, **kw).images
    got = pipe(prompts, **kw).images
    assert (got - expected).abs().max().item() <= 1e-4
    got = pipe(prompts, attention_kwargs={"scale": 1.0}, **kw).images  # a LoRA scale of 1 is a no-op
    assert (got - expected).abs().max().item() <= 1e-4
    with pytest.raises(SanaflowError, match="no LoRA layers.*scale=0.5"):
        pipe(prompts, attention_kwargs={"scale": 0.5}, **kw)


def test_our_models_run_inside_diffusers_sprint_pipeline(tmp_path):
    from diffusers import SanaSprintPipeline

    from tiny_sana import save_tiny_sprint

    folder = save_tiny_sprint(tmp_path / "sprint", sample_size=8)
    ref = SanaSprintPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    pipe = _with_our_models(ref, folder)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=4.5, latents=latents, output_type="pt",
              use_resolution_binning=False)
    expected = ref(["a red star", "a blue square"], generator=torch.Generator().manual_seed(0), **kw).images
    got = pipe(["a red star", "a blue square"], generator=torch.Generator().manual_seed(0), **kw).images
    assert (got - expected).abs().max().item() <= 1e-4


def test_transformer_return_dict_and_attention_kwargs(ours):
    net = ours.transformer
    c = net.config
    x = torch.randn(1, c.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 3, c.caption_channels, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = net(x, ctx, 0.5)
        wrapped = net(x, ctx, 0.5, return_dict=True)
        as_tuple = net(x, ctx, 0.5, return_dict=False, attention_kwargs={})
    assert isinstance(plain, torch.Tensor)
    assert torch.equal(wrapped.sample, plain) and torch.equal(wrapped[0], plain)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], plain)
    for bad, match in [({"lora_scale": 1.0}, "lora_scale"), ([("scale", 1.0)], "dict or None"),
                       ({"scale": "1"}, "scale='1'")]:
        with pytest.raises(SanaflowError, match=match):
            net(x, ctx, 0.5, attention_kwargs=bad)


def test_prompt_embeds_give_the_images_of_the_prompts(ours, ref):
    prompts = ["a red star above a blue square", "a photo of a cat"]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = dict(height=32, width=32, num_inference_steps=STEPS, guidance_scale=4.5, latents=latents,
              output_type="pt", use_resolution_binning=False, num_images_per_prompt=2)
    expected = ours(prompts, negative_prompt="blurry", **kw).images
    batch = [p for p in prompts for _ in range(2)]  # what the call encodes: images of a prompt in a row
    cond, uncond = ours.encode_prompts(prompts, ["blurry"] * 2)
    both = ours(prompt_embeds=cond[0], prompt_attention_mask=cond[1], negative_prompt_embeds=uncond[0],
                negative_prompt_attention_mask=uncond[1], **kw)
    assert (both.images - expected).abs().max().item() <= 1e-5 and len(both.prompts) == len(batch)
    # the negative encoded by the pipeline, padded to the (trimmed) length of the given features
    only = ours(prompt_embeds=cond[0], prompt_attention_mask=cond[1], negative_prompt="blurry", **kw).images
    assert (only - expected).abs().max().item() <= 1e-5
    # diffusers' own encode_prompt output serves as well (its __call__ passes SANA's instruction prefix;
    # encode_prompt's default is none)
    from sanaflow.models.text_encoders import SANA_COMPLEX_HUMAN_INSTRUCTION

    pe, pm, ne, nm = ref.encode_prompt(prompts, negative_prompt="blurry", do_classifier_free_guidance=True,
                                       complex_human_instruction=list(SANA_COMPLEX_HUMAN_INSTRUCTION))
    theirs = ours(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                  negative_prompt_attention_mask=nm, **kw).images
    assert (theirs - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give a prompt, or prompt_embeds"),
    ({"prompt": "a cat", "prompt_embeds": torch.zeros(1, 3, 16)}, "not both"),
    ({"prompt_embeds": torch.zeros(1, 3, 16)}, "needs its prompt_attention_mask"),
    ({"prompt_embeds": torch.zeros(1, 3, 5), "prompt_attention_mask": torch.ones(1, 3)}, r"\(B, L, 16\)"),
    ({"prompt_embeds": torch.zeros(1, 3, 16), "prompt_attention_mask": torch.ones(1, 4)}, r"must be a \(1, 3\)"),
    ({"prompt_embeds": torch.zeros(1, 3, 16), "prompt_attention_mask": torch.full((1, 3), 2)}, "only 0"),
    ({"prompt_embeds": torch.full((1, 3, 16), float("nan")), "prompt_attention_mask": torch.ones(1, 3)}, "NaN"),
    ({"prompt": "a cat", "negative_prompt_embeds": torch.zeros(1, 3, 16)}, "need prompt_embeds"),
    ({"prompt_embeds": torch.zeros(1, 3, 16), "prompt_attention_mask": torch.ones(1, 3), "negative_prompt": "x",
      "negative_prompt_embeds": torch.zeros(1, 3, 16), "negative_prompt_attention_mask": torch.ones(1, 3)}, "not both"),
    ({"prompt_embeds": torch.zeros(1, 3, 16), "prompt_attention_mask": torch.ones(1, 3),
      "negative_prompt_embeds": torch.zeros(1, 4, 16), "negative_prompt_attention_mask": torch.ones(1, 4)}, "shape of"),
])
def test_bad_prompt_embeds(ours, kwargs, match):
    with pytest.raises(SanaflowError, match=match):
        ours(num_inference_steps=1, height=32, width=32, **kwargs)


def test_output_indexes_like_diffusers(ours):
    out = ours("a red star", num_inference_steps=1, height=32, width=32, seed=3, output_type="np")
    assert out[0] is out.images and out[1] == out.seeds == [3] and out[2] == out.prompts
