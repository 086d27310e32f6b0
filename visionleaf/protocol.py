"""The iMCoT conversation protocol (DeepEyes-compatible) on the Qwen2.5-VL chat template.

Layout of one trajectory (``|`` marks the mask boundaries; M = response_mask 1, O = response_mask 0)::

    <|im_start|>system\\n{tools prompt}<|im_end|>\\n<|im_start|>user\\n{image}{question}<|im_end|>\\n
    <|im_start|>assistant\\n                                                          (prompt ends here)
    | <think>..</think><tool_call>{..}</tool_call><|im_end|>                          M
    | \\n<|im_start|>user\\n<tool_response>{crop image}</tool_response><|im_end|>\\n<|im_start|>assistant\\n   O
    | <think>..</think><answer>B</answer><|im_end|>                                   M

This is exactly what the processor's chat template produces for the whole conversation, so a
trajectory built turn by turn tokenises identically to the template (tested).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from visionleaf.tools.base import Tool

IMAGE_PLACEHOLDER = "<image>"
"""Marks an image inside a text prompt (verl's RLHF dataset convention)."""

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
"""One image as the chat template writes it, before the processor expands ``<|image_pad|>``."""

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

SYSTEM_PROMPT_TEMPLATE = """You are a careful visual assistant. You can look closer at the image with tools.

# Tools

You may call one of the functions below per turn. Their signatures are given inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, write a JSON object with the function name and its arguments inside
<tool_call></tool_call>, for example:
<tool_call>
{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": [10, 20, 200, 180], "label": "the sign"}}}}
</tool_call>
Coordinates are absolute pixels in the image as you see it. The result comes back in the next user
turn inside <tool_response></tool_response>."""

FORMAT_INSTRUCTION = (
    "Think first inside <think></think>. Then either call one tool inside <tool_call></tool_call>, "
    "or give the final answer inside <answer></answer>."
)

OBSERVATION_PREFIX = f"\n{IM_START}user\n<tool_response>"
OBSERVATION_SUFFIX = f"</tool_response>{IM_END}\n{IM_START}assistant\n"


def system_prompt(tools: Sequence[Tool]) -> str:
    """System prompt listing ``tools`` as JSON schemas inside ``<tools></tools>``."""
    return SYSTEM_PROMPT_TEMPLATE.format(tools="\n".join(json.dumps(t.schema()) for t in tools))


def build_messages(question: str, tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Chat messages for one item, in verl's RLHF-dataset form (``<image>`` marks the image)."""
    return [
        {"role": "system", "content": system_prompt(tools)},
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}\n{FORMAT_INSTRUCTION}"},
    ]


def observation_text(text: str = "", num_images: int = 0) -> str:
    """The observation turn appended after a tool call, in chat-template form (images unexpanded).

    It starts right after the assistant's ``<|im_end|>`` and ends with the next assistant header.
    """
    return f"{OBSERVATION_PREFIX}{VISION_BLOCK * num_images}{text}{OBSERVATION_SUFFIX}"


_OBSERVATION = re.compile(r"<tool_response>.*?</tool_response>", re.DOTALL)


def split_assistant_turns(response: str) -> list[str]:
    """Split a decoded multi-turn response into the assistant turns (observations removed).

    Works on text decoded with or without special tokens: the role words around each
    ``<tool_response>`` block are dropped. The first turn is everything before the first observation.
    """
    turns, start = [], 0
    for match in _OBSERVATION.finditer(response):
        turns.append(response[start : match.start()])
        start = match.end()
    turns.append(response[start:])
    return [_strip_role(turn, first=i == 0, last=i == len(turns) - 1) for i, turn in enumerate(turns)]


def _strip_role(turn: str, first: bool, last: bool) -> str:
    if not first:  # drop "<|im_end|>\n<|im_start|>assistant\n" (or "\nassistant\n") that opens the turn
        turn = re.sub(r"\A\s*(<\|im_end\|>)?\s*(<\|im_start\|>)?\s*assistant\s*\n", "", turn, count=1)
    if not last:  # drop "<|im_end|>\n<|im_start|>user\n" (or "\nuser\n") that closes the turn
        turn = re.sub(r"(<\|im_end\|>)?\s*(<\|im_start\|>)?\s*user\s*\Z", "", turn, count=1)
    return turn


def observation_texts(response: str) -> list[str]:
    """The contents of every ``<tool_response>`` block in a decoded response, in order."""
    return [m.group(0)[len("<tool_response>") : -len("</tool_response>")] for m in _OBSERVATION.finditer(response)]


IMAGE_PAD = "<|image_pad|>"


def image_pixel_budget(image_processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor."""
    size = image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


def image_token_count(image_size: tuple[int, int], image_processor: Any) -> int:
    """Visual tokens (``<|image_pad|>`` after expansion) an image of ``image_size`` (w, h) takes."""
    patches = image_processor.get_number_of_image_patches(image_size[1], image_size[0], {})
    return int(patches) // image_processor.merge_size**2


def expand_image_pads(text: str, images: Sequence[Image.Image], image_processor: Any) -> str:
    """Replace the i-th ``<|image_pad|>`` of ``text`` by as many pads as image i takes (as the processor does)."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(images):
        raise ValueError(f"text has {len(parts) - 1} {IMAGE_PAD} but {len(images)} images were given")
    out = [parts[0]]
    for image, part in zip(images, parts[1:], strict=True):
        out.append(IMAGE_PAD * image_token_count(image.size, image_processor) + part)
    return "".join(out)


@dataclass(frozen=True)
class TokenizedTrajectory:
    """A multi-turn trajectory as token ids, ready for the trainer."""

    prompt_ids: list[int]
    """System + user turn + ``<|im_start|>assistant\\n``, image pads expanded."""
    response_ids: list[int]
    """Model turns and observation turns, in order."""
    response_mask: list[int]
    """1 on model-generated tokens, 0 on observation tokens; aligned with ``response_ids``."""
    images: list[Image.Image]
    """Every image in order: the prompt's, then each observation's."""


def tokenize_trajectory(
    processor: Any,
    prompt_text: str,
    prompt_images: Sequence[Image.Image],
    turns: Sequence[tuple[str, Sequence[Image.Image] | None, str]],
) -> TokenizedTrajectory:
    """Tokenise a trajectory segment by segment and build its ``response_mask``.

    ``prompt_text`` is the chat-template text of the prompt (ending with the assistant header).
    ``turns`` are ``(assistant_text, observation_images, observation_text)``; ``assistant_text`` is what
    the model generated, ending with ``<|im_end|>``; ``observation_images`` is None for the final turn
    (no observation follows). Segments meet at special tokens, so this equals tokenising the whole
    conversation at once (tested against the processor).
    """
    tokenizer, image_processor = processor.tokenizer, processor.image_processor

    def encode(text: str, images: Sequence[Image.Image]) -> list[int]:
        return list(tokenizer.encode(expand_image_pads(text, images, image_processor), add_special_tokens=False))

    prompt_ids = encode(prompt_text, prompt_images)
    response_ids: list[int] = []
    response_mask: list[int] = []
    images = list(prompt_images)
    for assistant_text, observation_images, observation in turns:
        ids = encode(assistant_text, ())
        response_ids += ids
        response_mask += [1] * len(ids)
        if observation_images is None:
            continue
        ids = encode(observation_text(observation, len(observation_images)), observation_images)
        response_ids += ids
        response_mask += [0] * len(ids)
        images += observation_images
    return TokenizedTrajectory(prompt_ids, response_ids, response_mask, images)


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """verl-style messages (``<image>`` inside string content) -> chat-template content lists."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            parts: list[dict[str, Any]] = []
            for i, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if i:
                    parts.append({"type": "image"})
                if text:
                    parts.append({"type": "text", "text": text})
            content = parts
        out.append({**message, "content": content})
    return out


def render_prompt(processor: Any, messages: Sequence[dict[str, Any]]) -> str:
    """Chat-template text of the prompt, ending with the assistant header (image pads unexpanded)."""
    text = processor.apply_chat_template(template_messages(messages), add_generation_prompt=True, tokenize=False)
    return str(text)
