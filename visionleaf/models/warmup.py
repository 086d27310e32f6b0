"""Format warm-up: a short supervised pass that teaches a tiny random model the iMCoT protocol.

A random model never writes a well-formed ``<tool_call>``, so tree splits, tools and rewards would never
be exercised on CPU. A few hundred steps on synthetic transcripts (think -> zoom into the quadrant of the
target -> answer, or think -> answer) teach the format in about a minute on 2 cores. The loss covers model
tokens only (``response_mask``).

On the ``stripes`` task (:func:`visionleaf.data.synthetic.generate_stripes`, the main job's) a transcript
searches the quadrants: it zooms into one (any of the four: the tiny model does not learn to locate the square
in its 2 x 2-token global view), reads the stripes when the crop holds the square, and otherwise zooms into
another quadrant (:data:`STRIPES_PERSIST`) or gives up and guesses; 20% answer at once with a guess. So the
warm model is a beginner with room to improve: RL can teach it to keep searching (three zooms find the
square 3 times in 4). A reading phase comes first (``reading_steps``): trained on the mix from the start,
the vision tower never learns the stripes (teacher-forced after 1200 mixed steps: 15/32 crops of the
square read right).

Measured for the main job's model (600 reading + 1500 steps, lr 1e-3, 2.8 min; 32 held-out items x 2
samples at temperature 0.7): every leaf ends with an answer, 0.78 successful zooms per leaf; teacher-forced
it reads 32/32 of the square's quadrant crops; accuracy 0.52 with its own crops, 0.67 with the square's
GT crop, 0.42 with crops swapped for noise. With 400 + 1000 steps it zooms 0.34 times per leaf and writes
malformed boxes (accuracy 0.42).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from visionleaf.data.images import load_image
from visionleaf.data.schema import OPTION_LETTERS, Item
from visionleaf.data.synthetic import STRIPES_CATEGORY, quadrant_box
from visionleaf.protocol import IM_END, TokenizedTrajectory, image_pixel_budget, render_prompt, tokenize_trajectory
from visionleaf.tools import Observation, ToolCall, ToolContext, run_tool
from visionleaf.tools.crop import model_size, resize_to_budget

STRIPES_TOOL_RATE = 0.8
"""Share of ``stripes`` transcripts that zoom before answering."""
STRIPES_LOCALISE = 0.25
"""Share of ``stripes`` transcripts whose first zoom goes to the square's own quadrant (0.25: the search order
is a uniform permutation of the four; the tiny model does not learn to locate the square in its 2 x 2-token
global view, so the warm-up does not pretend to teach it)."""
STRIPES_PERSIST = 0.5
"""Share of ``stripes`` transcripts that zoom into another quadrant after a crop without the square (the rest
guess): RL can learn to keep searching."""
STRIPES_MAX_ZOOMS = 3
"""Zooms of a ``stripes`` transcript at most (then it guesses)."""
QUADRANT_NAMES = ("top left", "top right", "bottom left", "bottom right")


@dataclass(frozen=True)
class _StripesViews:
    """What a ``stripes`` transcript shows: the global view at the processor's size and each quadrant's zoom."""

    view: Image.Image
    zooms: tuple[Observation, ...]
    """The zoom tool's observation of quadrant 0-3 (see :func:`quadrant_box`)."""


@functools.lru_cache(maxsize=128)
def _stripes_views(view_path: str, original_path: str, min_pixels: int, max_pixels: int) -> _StripesViews:
    """Cut once per image: loading a 2k canvas and cropping it costs more than a warm-up step."""
    view = resize_to_budget(load_image(view_path), min_pixels, max_pixels)
    context = ToolContext(load_image(original_path), view.size, min_pixels, max_pixels)
    zooms = tuple(
        run_tool(ToolCall("image_zoom_in_tool", {"bbox_2d": list(quadrant_box(q, view.size))}), context)
        for q in range(4)
    )
    return _StripesViews(view, zooms)


def _stripes_transcript(
    item: Item, rng: random.Random, processor: Any, tool_rate: float, localise: float
) -> TokenizedTrajectory:
    """A ``stripes`` trajectory: search the quadrants one zoom at a time; read the stripes once a crop holds
    the square, or give up and guess. The global view is passed already resized to the processor's size."""
    views = _stripes_views(item.image, item.original_image, *image_pixel_budget(processor.image_processor))
    prompt = render_prompt(processor, item.messages)
    truth = item.options[OPTION_LETTERS.index(item.ground_truth)]
    guess = rng.choice(item.options)
    if rng.random() >= tool_rate:
        answer = f"<think>The stripes are too fine to see here.</think><answer>{guess}</answer>{IM_END}"
        return tokenize_trajectory(processor, prompt, [views.view], [(answer, None, "")])
    x1, y1, x2, y2 = item.gt_boxes[0]
    width, height = item.original_size
    own = int((x1 + x2) / 2 >= width / 2) + 2 * int((y1 + y2) / 2 >= height / 2)
    others = rng.sample([q for q in range(4) if q != own], 3)
    order = [own, *others] if rng.random() < localise else others[:1] + rng.sample([own, *others[1:]], 3)
    turns: list[tuple[str, list[Image.Image] | None, str]] = []
    thought = ""
    for quadrant in order[:STRIPES_MAX_ZOOMS]:
        call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": list(quadrant_box(quadrant, views.view.size))}}
        zoom = (
            f"<think>{thought}Let me zoom in on the {QUADRANT_NAMES[quadrant]}.</think>"
            f"<tool_call>{json.dumps(call)}</tool_call>{IM_END}"
        )
        observation = views.zooms[quadrant]
        turns.append((zoom, list(observation.images), observation.text))
        if quadrant == own:
            answer = f"<think>The stripes are {truth}.</think><answer>{truth}</answer>{IM_END}"
            break
        answer = f"<think>The square is not here.</think><answer>{guess}</answer>{IM_END}"
        if rng.random() >= STRIPES_PERSIST:
            break
        thought = "The square is not here. "
    return tokenize_trajectory(processor, prompt, [views.view], [*turns, (answer, None, "")])


def transcript(
    item: Item,
    rng: random.Random,
    processor: Any,
    tool_rate: float | None = None,
    localise: float = STRIPES_LOCALISE,
) -> TokenizedTrajectory:
    """A tokenised trajectory for ``item``: a zoom then an answer, or a direct answer. ``tool_rate``
    defaults to :data:`STRIPES_TOOL_RATE` on ``stripes`` items and 0.7 on the others; ``localise`` applies
    to ``stripes`` items (see the module docstring)."""
    if item.category == STRIPES_CATEGORY:
        rate = STRIPES_TOOL_RATE if tool_rate is None else tool_rate
        return _stripes_transcript(item, rng, processor, rate, localise)
    tool_rate = 0.7 if tool_rate is None else tool_rate
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
    model: Any,
    processor: Any,
    items: Sequence[Item],
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    localise: float = STRIPES_LOCALISE,
    reading_steps: int = 0,
) -> list[float]:
    """Train ``model`` in place on ``steps`` transcripts (batch 1); returns the loss per step.

    ``reading_steps`` > 0 first runs a reading phase of that many steps on its own schedule, where every
    ``stripes`` transcript zooms into the square's quadrant and reads it: the tiny vision tower learns the
    stripes only when every crop it is trained on shows them (mixed in with wrong-quadrant zooms and
    direct guesses from the start, it never does)."""
    losses = []
    if reading_steps > 0:
        losses += _train(model, processor, items, reading_steps, lr, seed, tool_rate=1.0, localise=1.0)
    return losses + _train(model, processor, items, steps, lr, seed + 1, tool_rate=None, localise=localise)


def _train(
    model: Any,
    processor: Any,
    items: Sequence[Item],
    steps: int,
    lr: float,
    seed: int,
    tool_rate: float | None,
    localise: float,
) -> list[float]:
    """``steps`` steps of AdamW at ``lr`` decaying linearly to 0, on :func:`transcript` of random items."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # linear decay
    model.train()
    losses = []
    for _ in range(steps):
        traj = transcript(rng.choice(items), rng, processor, tool_rate=tool_rate, localise=localise)
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
