"""Format warm-up: a short supervised pass that teaches a tiny random model the iMCoT protocol.

A random model never writes a well-formed ``<tool_call>``, so tree splits, tools and rewards would never
be exercised on CPU. A few hundred steps on synthetic transcripts (think -> zoom into the quadrant of the
target -> answer, or think -> answer) teach the format in under a minute on 2 cores (400 steps: ~50 s).
Answers are right only half of the time, so RL still has something to learn. The loss covers model
tokens only (``response_mask``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import torch

from visionleaf.data.images import load_image
from visionleaf.data.schema import OPTION_LETTERS, Item
from visionleaf.protocol import IM_END, image_pixel_budget, render_prompt, tokenize_trajectory
from visionleaf.tools import ToolCall, ToolContext, run_tool
from visionleaf.tools.crop import model_size


def transcript(item: Item, rng: random.Random, processor: Any, tool_rate: float = 0.7) -> Any:
    """A tokenised trajectory for ``item``: a zoom on the (jittered) target then an answer, or a direct answer."""
    image = load_image(item.image)
    original = load_image(item.original_image)
    min_pixels, max_pixels = image_pixel_budget(processor.image_processor)
    size = model_size(image.size, min_pixels, max_pixels)
    letters = OPTION_LETTERS[: max(len(item.options), 1)]
    letter = item.ground_truth if rng.random() < 0.5 else rng.choice(letters)
    answer = f"<think>The answer is {letter}.</think><answer>{letter}</answer>{IM_END}"
    prompt = render_prompt(processor, item.messages)
    if rng.random() >= tool_rate or not item.gt_boxes:
        return tokenize_trajectory(processor, prompt, [image], [(answer, None, "")])
    # The quadrant of the model-space image that holds the target (a random one 30% of the time): few
    # distinct boxes, so a tiny model learns to write four numbers; RL can then learn which quadrant.
    x1, y1, x2, y2 = item.gt_boxes[0]
    cx, cy = (x1 + x2) / 2 / original.width, (y1 + y2) / 2 / original.height
    col, row = (int(cx >= 0.5), int(cy >= 0.5)) if rng.random() < 0.7 else (rng.randrange(2), rng.randrange(2))
    half_w, half_h = size[0] // 2, size[1] // 2
    bbox = [col * half_w, row * half_h, (col + 1) * half_w, (row + 1) * half_h]
    call = ToolCall("image_zoom_in_tool", {"bbox_2d": bbox})
    text = json.dumps({"name": call.name, "arguments": call.arguments})
    zoom = f"<think>The target is small. Let me zoom in.</think><tool_call>{text}</tool_call>{IM_END}"
    observation = run_tool(call, ToolContext(original, size, min_pixels, max_pixels))
    return tokenize_trajectory(
        processor, prompt, [image], [(zoom, list(observation.images), observation.text), (answer, None, "")]
    )


def format_warmup(
    model: Any, processor: Any, items: Sequence[Item], steps: int = 200, lr: float = 3e-3, seed: int = 0
) -> list[float]:
    """Train ``model`` in place on ``steps`` transcripts (batch 1); returns the loss per step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # linear decay
    model.train()
    losses = []
    for _ in range(steps):
        traj = transcript(rng.choice(items), rng, processor)
        ids = torch.tensor([traj.prompt_ids + traj.response_ids])  # [1, L]
        labels = torch.tensor(
            [
                [-100] * len(traj.prompt_ids)
                + [t if m else -100 for t, m in zip(traj.response_ids, traj.response_mask, strict=True)]
            ]
        )
        vision = processor.image_processor(images=traj.images, return_tensors="pt")
        loss = model(
            input_ids=ids,
            labels=labels,
            pixel_values=vision["pixel_values"],
            image_grid_thw=vision["image_grid_thw"],
            mm_token_type_ids=(ids == image_pad).int(),
        ).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
