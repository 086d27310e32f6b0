"""Actor step time with VEPO on vs off, on the same batches in one run (the part of a step VEPO changes).

    .venv/bin/python benchmarks/vepo_overhead.py                        # tiny Qwen2.5-VL, small BPE vocab
    .venv/bin/python benchmarks/vepo_overhead.py --vocab qwen --hidden 256 --layers 4   # V = 151k

One step, as verl's actor runs it after the rollout:

- off: old-policy forward (log-probs, entropy), then a training forward/backward and an optimizer step;
- on:  the same plus VEPO's counterfactual forward with every image patch-blackened, the full-vocabulary
  JSD in chunks, and the top-k selection (the training step then uses the selected tokens).

Both modes run alternately on the same batch, ``--repeats`` times each; the medians are printed with the
ratio on / off and where the extra time goes. The rollout (usually most of a real step) is not part of
this step, so the ratio here is an upper bound on the ratio of whole training steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from visionleaf.algo.loss import clipped_policy_loss
from visionleaf.algo.vepo import VepoConfig, perturb_patches, select_tokens, token_entropy, token_jsd
from visionleaf.models import tiny


def build_batch(processor: Any, batch: int, response_tokens: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """``batch`` sequences of a question with a global view, a response and a crop observation inside it.

    Returns the model inputs and the [B, T] model-token mask (1 on response tokens, 0 on the prompt and crop).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # ordinary tokens lie below the specials
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    texts, images = [], []
    for i in range(batch):
        words = torch.randint(0, vocab, (2 * response_tokens,), generator=g).tolist()
        first = processor.tokenizer.decode(words[:response_tokens])
        second = processor.tokenizer.decode(words[response_tokens:])
        texts.append(
            f"<|im_start|>user\n{image}What is shown?<|im_end|>\n<|im_start|>assistant\n{first}{image}{second}"
        )
        view = Image.new("RGB", (224, 224), (40 * i % 255, 90, 160))
        crop = Image.new("RGB", (112, 112), (200, 40 * i % 255, 30))
        images.append([view, crop])
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    ids = inputs["input_ids"]  # [B, T]
    start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assistant = processor.tokenizer("<|im_start|>assistant\n")["input_ids"]
    mask = torch.zeros_like(ids)
    for row in range(ids.shape[0]):
        tokens = ids[row].tolist()
        begin = next(i for i in range(len(tokens)) if tokens[i : i + len(assistant)] == assistant) + len(assistant)
        mask[row, begin:] = inputs["attention_mask"][row, begin:]
        crop_start = tokens.index(start, begin)
        mask[row, crop_start : tokens.index(end, crop_start) + 1] = 0  # the crop is an observation
    return dict(inputs), mask


def next_token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token; [B, T, V], [B, T] -> [B, T - 1]."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def timed(clock: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
    return result


def actor_step(
    model: Any, optimizer: Any, inputs: dict, mask: torch.Tensor, vepo: VepoConfig | None, image_processor: Any
) -> dict[str, float]:
    """One actor step; returns seconds per part."""
    clock: dict[str, float] = {}
    ids = inputs["input_ids"]
    model_mask = mask[:, 1:]  # [B, T - 1]: position t predicts token t + 1
    with torch.no_grad():
        real = timed(clock, "old_log_prob", lambda: model(**inputs).logits)  # [B, T, V]
        old = timed(clock, "old_log_prob", lambda: next_token_log_probs(real, ids))  # [B, T - 1]
        flat = real[:, :-1].reshape(-1, real.shape[-1])  # [B * (T - 1), V]
        entropy = timed(clock, "old_log_prob", lambda: token_entropy(flat).view_as(old))  # [B, T - 1]
        train_mask = model_mask
        if vepo is not None:
            pixels = inputs["pixel_values"]

            def perturbed_forward() -> torch.Tensor:
                generator = torch.Generator().manual_seed(0)
                noisy = perturb_patches(pixels, vepo, generator, image_processor.image_mean, image_processor.image_std)
                return model(**{**inputs, "pixel_values": noisy}).logits  # [B, T, V]

            fake = timed(clock, "vepo_forward", perturbed_forward)
            fake_flat = fake[:, :-1].reshape(-1, fake.shape[-1])  # [B * (T - 1), V]
            jsd = timed(clock, "vepo_jsd", lambda: token_jsd(flat, fake_flat, vepo.chunk).view_as(old))
            selection = timed(clock, "vepo_select", lambda: select_tokens(entropy, jsd, model_mask, vepo))
            train_mask = selection.mask.long()
    advantages = torch.linspace(-1, 1, ids.shape[0])[:, None].expand_as(old)  # [B, T - 1]

    def train() -> None:
        log_prob = next_token_log_probs(model(**inputs).logits, ids)  # [B, T - 1]
        loss, _ = clipped_policy_loss(log_prob, old, advantages, train_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    timed(clock, "update_actor", train)
    return clock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", choices=("bpe", "qwen"), default="bpe", help="tokenizer of the tiny model")
    parser.add_argument("--hidden", type=int, default=128, help="text hidden size (head_dim 32)")
    parser.add_argument("--layers", type=int, default=2, help="text decoder layers")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--response", type=int, default=96, help="random response tokens before and after the crop")
    parser.add_argument("--repeats", type=int, default=5, help="steps per mode (alternating)")
    parser.add_argument("--chunk", type=int, default=1024, help="visionleaf.vepo.chunk")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer(args.vocab)
    processor = tiny.build_processor(tokenizer)
    text = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 32}
    text["num_key_value_heads"] = max(1, text["num_attention_heads"] // 2)
    model = tiny.build_model(tokenizer, text_config=text).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    inputs, mask = build_batch(processor, args.batch, args.response)
    vepo = VepoConfig(mode="vepo", chunk=args.chunk)
    vocab = model.config.text_config.vocab_size
    print(
        f"batch {args.batch} x {inputs['input_ids'].shape[1]} tokens ({int(mask.sum())} model tokens), "
        f"{inputs['pixel_values'].shape[0]} image patches, V = {vocab}, hidden {args.hidden}, {args.layers} layers"
    )
    actor_step(model, optimizer, inputs, mask, vepo, processor.image_processor)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        runs["off"].append(actor_step(model, optimizer, inputs, mask, None, processor.image_processor))
        runs["on"].append(actor_step(model, optimizer, inputs, mask, vepo, processor.image_processor))
    totals = {mode: statistics.median(sum(r.values()) for r in steps) for mode, steps in runs.items()}
    print(f"actor step, median of {args.repeats}: off {totals['off']:.3f} s, on {totals['on']:.3f} s")
    print(f"ratio on / off: {totals['on'] / totals['off']:.2f}x (target <= 1.4x for a whole training step)")
    for part in ("old_log_prob", "vepo_forward", "vepo_jsd", "vepo_select", "update_actor"):
        seconds = statistics.median(r.get(part, 0.0) for r in runs["on"])
        print(f"  on: {part:<13} {seconds:.3f} s ({seconds / totals['on']:.0%})")


if __name__ == "__main__":
    main()
