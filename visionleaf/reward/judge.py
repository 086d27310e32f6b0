"""Optional LLM judge for free-form answers: an OpenAI-compatible ``/chat/completions`` endpoint.

The HTTP client is created on the first request, never at import. An unreachable judge raises
:class:`JudgeUnavailableError` after the configured retries: it is never scored as a silent 0.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

JUDGE_SYSTEM_PROMPT = (
    "You grade answers to questions about images. Reply with one word: yes if the model answer means "
    "the same as the reference answer, otherwise no."
)


class JudgeError(RuntimeError):
    """The judge answered, but not with a usable chat completion (4xx, malformed JSON)."""


class JudgeUnavailableError(JudgeError):
    """The judge could not be reached (connection error, timeout, 5xx) after all retries."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to reach the judge."""

    base_url: str
    """OpenAI-compatible API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended)."""
    model: str
    """Model name the server expects in the request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; unset -> no ``Authorization`` header (local servers)."""
    timeout_s: float = 30
    """Per-request timeout in seconds (connect and read)."""
    max_retries: int = 3
    """Retries after the first attempt, on connection errors, timeouts and 5xx."""
    backoff_s: float = 1.0
    """Sleep before retry ``i`` (0-based) is ``backoff_s * 2**i`` seconds."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge.base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("judge.model must name the model the server serves, got an empty string")
        if self.timeout_s <= 0:
            raise ValueError(f"judge.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"judge.max_retries must be >= 0 (0 = a single attempt), got {self.max_retries}")
        if self.backoff_s < 0:
            raise ValueError(f"judge.backoff_s must be >= 0 seconds, got {self.backoff_s}")


_YES = re.compile(r"\W*yes\b", re.IGNORECASE)


class LLMJudge:
    """Scores a free-form answer 1.0 (the judge replies "yes") or 0.0 (anything else)."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.url = f"{config.base_url.rstrip('/')}/chat/completions"
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _get_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {}
                if api_key := os.environ.get(self.config.api_key_env):
                    headers["Authorization"] = f"Bearer {api_key}"
                self._client = httpx.Client(timeout=self.config.timeout_s, headers=headers)
            return self._client

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant message text of one chat completion (temperature 0), with retries."""
        body: dict[str, Any] = {"model": self.config.model, "messages": messages, "temperature": 0.0}
        client = self._get_client()
        attempts = self.config.max_retries + 1
        cause = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                response = client.post(self.url, json=body)
            except httpx.TransportError as exc:
                cause = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500:
                cause = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise JudgeError(
                    f"LLM judge at {self.url} rejected the request with HTTP {response.status_code}: "
                    f"{response.text[:200]}; check judge.model and the key in ${self.config.api_key_env}"
                )
            try:
                return str(response.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(
                    f"LLM judge at {self.url} did not return a chat completion: {response.text[:200]!r}; "
                    "judge.base_url must be an OpenAI-compatible API root such as http://host:8000/v1"
                ) from None
        raise JudgeUnavailableError(
            f"LLM judge at {self.url} unreachable after {attempts} attempt(s): {cause}; start the server, "
            "fix judge.base_url, or drop the judge config to score free-form answers by rule only"
        )

    def score(self, question: str, answer: str, ground_truth: str) -> float:
        """1.0 when the judge says ``answer`` matches ``ground_truth`` for ``question``, else 0.0."""
        reply = self.complete(
            [
                {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": f"Question: {question}\nReference answer: {ground_truth}\n"
                    f"Model answer: {answer}\nIs the model answer correct? Reply yes or no.",
                },
            ]
        )
        return float(bool(_YES.match(reply)))

    def close(self) -> None:
        """Close the HTTP client, if one was created."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


@functools.cache
def get_judge(config: JudgeConfig) -> LLMJudge:
    """One shared :class:`LLMJudge` per config (reward functions are called once per sample)."""
    return LLMJudge(config)
