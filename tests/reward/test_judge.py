"""LLM judge against a tiny local OpenAI-compatible server (visionleaf/reward/judge.py)."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from visionleaf.reward import compute_score
from visionleaf.reward.judge import JudgeConfig, JudgeError, JudgeUnavailableError, LLMJudge, get_judge

SECRET = "sk-test-not-a-real-key"


def _completion(text):
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        # replies are consumed in order; the last one repeats
        status, payload = self.server.replies.pop(0) if len(self.server.replies) > 1 else self.server.replies[0]
        data = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.replies: list[tuple[int, str]] = [_completion("yes")]

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _config(base_url, **overrides):
    return JudgeConfig(base_url=base_url, model="judge-model", timeout_s=2, backoff_s=0.01, **overrides)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_judge_yes_scores_one_and_sends_a_chat_completion(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    judge = LLMJudge(_config(server.base_url))
    # nothing is created before the first request
    assert judge._client is None
    assert judge.score("What tower is this?", "the tower in Paris", "eiffel tower") == 1.0
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "judge-model"
    assert request["body"]["temperature"] == 0.0
    prompt = request["body"]["messages"][-1]["content"]
    assert "What tower is this?" in prompt and "the tower in Paris" in prompt and "eiffel tower" in prompt
    judge.close()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("yes", 1.0),  # plain
        ("Yes.", 1.0),  # capitalised with punctuation
        ("  **YES** the answers agree", 1.0),  # decorated
        ("no", 0.0),  # plain no
        ("No, it is a different tower", 0.0),  # explained no
        ("yesterday", 0.0),  # not the word yes
        ("I think so", 0.0),  # anything else is not a yes
    ],
)
def test_judge_verdicts(server, reply, expected):
    server.replies = [_completion(reply)]
    assert LLMJudge(_config(server.base_url)).score("q", "a", "b") == expected


def test_no_key_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    LLMJudge(_config(server.base_url)).score("q", "a", "b")
    assert "Authorization" not in server.requests[0]["headers"]


def test_retries_5xx_then_succeeds(server):
    server.replies = [(503, "busy"), (500, "oops"), _completion("yes")]
    assert LLMJudge(_config(server.base_url, max_retries=2)).score("q", "a", "b") == 1.0
    assert len(server.requests) == 3


def test_5xx_after_all_retries_raises_unavailable_without_the_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server.replies = [(500, "internal error")]
    judge = LLMJudge(_config(server.base_url, max_retries=1))
    with pytest.raises(
        JudgeUnavailableError, match=r"/v1/chat/completions unreachable after 2 attempt.*HTTP 500"
    ) as err:
        judge.score("q", "a", "b")
    assert SECRET not in str(err.value)
    assert len(server.requests) == 2


def test_4xx_is_not_retried(server):
    server.replies = [(401, '{"error": "bad key"}')]
    with pytest.raises(JudgeError, match=r"HTTP 401.*OPENAI_API_KEY") as err:
        LLMJudge(_config(server.base_url)).score("q", "a", "b")
    assert not isinstance(err.value, JudgeUnavailableError)
    assert len(server.requests) == 1


def test_malformed_completion_raises(server):
    server.replies = [(200, '{"result": "yes"}')]
    with pytest.raises(JudgeError, match="did not return a chat completion"):
        LLMJudge(_config(server.base_url)).score("q", "a", "b")


def test_unreachable_port_raises_quickly():
    config = JudgeConfig(
        base_url=f"http://127.0.0.1:{_free_port()}/v1",
        model="m",
        timeout_s=0.5,
        max_retries=1,
        backoff_s=0.01,
    )
    start = time.monotonic()
    with pytest.raises(JudgeUnavailableError, match=r"127\.0\.0\.1.*unreachable after 2 attempt.*ConnectError"):
        LLMJudge(config).score("q", "a", "b")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": "127.0.0.1:8000/v1"}, "http://"),  # scheme missing
        ({"model": ""}, "judge.model"),  # empty model
        ({"timeout_s": 0}, "timeout_s"),  # no time to answer
        ({"max_retries": -1}, "max_retries"),  # negative retries
        ({"backoff_s": -1.0}, "backoff_s"),  # negative sleep
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        JudgeConfig(**{"base_url": "http://127.0.0.1:8000/v1", "model": "m", **overrides})


def test_get_judge_is_shared_per_config():
    config = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m")
    assert get_judge(config) is get_judge(config)
    # sharing never opens a connection by itself
    assert get_judge(config)._client is None


FREE_FORM = "<think>a landmark</think><answer>the tower in Paris</answer>"


def test_compute_score_asks_the_judge_for_free_form(server):
    server.replies = [_completion("yes")]
    judge = {"base_url": server.base_url, "model": "judge-model", "timeout_s": 2}
    result = compute_score("vstar", FREE_FORM, "eiffel tower", {"question": "Which tower?"}, judge=judge)
    # the rule matcher says 0, the judge says yes: 0.8 * 1, no tool call
    assert result["acc"] == 1.0
    assert result["score"] == pytest.approx(0.8)
    assert "Which tower?" in server.requests[0]["body"]["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("response", "ground_truth", "extra_info"),
    [
        ("<think>x</think><answer>B</answer>", "B", {"options": ["blue", "red"]}),  # multiple choice
        ("<think>x</think><answer>4</answer>", "3", {}),  # a number
        ("<think>x</think><answer>Eiffel Tower</answer>", "eiffel tower", {}),  # rule match already 1
        ("<think>x</think><tool_call>", "eiffel tower", {}),  # no answer to judge
    ],
)
def test_compute_score_does_not_ask_the_judge(server, response, ground_truth, extra_info):
    compute_score("vstar", response, ground_truth, extra_info, judge=_config(server.base_url))
    assert server.requests == []


def test_compute_score_surfaces_an_unreachable_judge():
    judge = JudgeConfig(base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", timeout_s=0.5, max_retries=0)
    with pytest.raises(JudgeUnavailableError):
        compute_score("vstar", FREE_FORM, "eiffel tower", judge=judge)
