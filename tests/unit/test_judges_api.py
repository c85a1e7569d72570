"""The OpenAI-compatible API judge against a local HTTP server that speaks /v1/chat/completions."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from locaudit.errors import ConfigError, DataError
from locaudit.evaluate.judges import CachedJudge, References, get_judge
from locaudit.evaluate.judges.api import ApiError, ApiJudge, RateLimiter, parse_api_spec
from locaudit.evaluate.judges.base import normalise_question


def completion(content: str = "yes", top: list[tuple[str, float]] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": top[0][0], "logprob": top[0][1],
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class Server:
    """A local chat-completions server. `script` is a list of (status, body) replies used in order (the
    last repeats); with `script=None` it grades: 'yes' when the answer contains 'true', with logprobs."""

    def __init__(self, script=None, logprobs=True):
        self.script = list(script) if script is not None else None
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.logprobs = logprobs
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                owner.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                if owner.script is not None:
                    status, reply = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                    return self._send(status, reply)
                if body.get("logprobs") and not owner.logprobs:
                    return self._send(400, {"error": {"message": "logprobs is not supported by this model"}})
                user = body["messages"][-1]["content"]
                answer = user.split("Answer: ", 1)[1].split("\n", 1)[0]
                p = 0.8 if "true" in answer else 0.1
                word = "yes" if p > 0.5 else "no"
                top = [(" yes", math.log(p)), (" no", math.log(1 - p))] if body.get("logprobs") else None
                return self._send(200, completion(word, top))

            def _send(self, status, reply):
                data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_for(server: Server, **kw) -> ApiJudge:
    kw.setdefault("rps", 0)
    kw.setdefault("backoff_s", 0.01)
    return ApiJudge("test-model", server.url, **kw)


def test_api_judge_logprobs(monkeypatch):
    monkeypatch.setenv("LOCAUDIT_TEST_KEY", "sk-test")
    with Server() as srv:
        judge = judge_for(srv, key_env="LOCAUDIT_TEST_KEY")
        scores = judge.score(["Is it?", "Is it?"], ["It is true.", "It is false."])
    assert scores[0].truth == pytest.approx(0.8) and scores[0].info == pytest.approx(0.8)
    assert scores[1].truth == pytest.approx(0.1)
    assert len(srv.requests) == 4  # one per (pair, kind)
    req = srv.requests[0]
    assert req["model"] == "test-model" and req["max_tokens"] == 1 and req["logprobs"] is True
    assert srv.headers[0]["Authorization"] == "Bearer sk-test"


def test_api_judge_falls_back_to_text_without_logprobs():
    with Server(logprobs=False) as srv:
        judge = judge_for(srv, kinds=("truth",))
        scores = judge.score(["Q?", "Q?"], ["true", "nope"])
    assert [s.truth for s in scores] == [1.0, 0.0]
    assert all(s.info is None for s in scores)
    assert judge.logprobs is False
    assert "Authorization" not in srv.headers[0]  # no key in the environment: no header


def test_api_judge_retries_429_then_500():
    script = [(429, {"error": "slow down"}), (500, {"error": "oops"}), (200, completion("yes"))]
    with Server(script) as srv:
        judge = judge_for(srv, kinds=("truth",), logprobs=False)
        t0 = time.monotonic()
        score = judge.score_one("Q?", "A.")
    assert score.truth == 1.0
    assert len(srv.requests) == 3
    assert time.monotonic() - t0 >= 0.01 + 0.02  # backoff 0.01 s, then 0.02 s


def test_api_judge_gives_up():
    with Server([(503, {"error": "down"})]) as srv:
        judge = judge_for(srv, kinds=("truth",), max_retries=2)
        with pytest.raises(ApiError, match="gave up after 3 attempts.*HTTP 503"):
            judge.score_one("Q?", "A.")
    assert len(srv.requests) == 3


def test_api_judge_does_not_retry_400():
    with Server([(401, {"error": "bad key"})]) as srv:
        with pytest.raises(ApiError, match="HTTP 401"):
            judge_for(srv, kinds=("truth",)).score_one("Q?", "A.")
    assert len(srv.requests) == 1


@pytest.mark.parametrize("reply, field", [
    ({"id": "x"}, "choices"),
    ({"choices": []}, "choices[0]"),
    ({"choices": [{"index": 0}]}, "choices[0].message"),
    ({"choices": [{"message": {"role": "assistant"}}]}, "choices[0].message.content"),
    ({"choices": [{"message": {"content": "maybe"}}]}, "choices[0].message.content"),
    ({"choices": [{"message": {"content": "yes"}, "logprobs": {"content": [{"token": "yes"}]}}]},
     "choices[0].logprobs.content[0].top_logprobs"),
    ("this is not json", "not JSON"),
])
def test_api_judge_malformed_reply(reply, field):
    with Server([(200, reply)]) as srv:
        with pytest.raises(DataError, match="malformed reply|neither yes nor no") as err:
            judge_for(srv, kinds=("truth",)).score_one("Q?", "A.")
    assert field in str(err.value)
    assert srv.url in str(err.value)


def test_api_judge_rate_limit():
    with Server() as srv:
        judge = judge_for(srv, rps=20.0, kinds=("truth",), workers=4)
        t0 = time.monotonic()
        judge.score(["Q?"] * 6, [f"a{i}" for i in range(6)])
        elapsed = time.monotonic() - t0
    assert elapsed >= 5 / 20.0 - 0.01  # 6 request starts at least 50 ms apart


def test_rate_limiter_unlimited_is_instant():
    lim = RateLimiter(0)
    t0 = time.monotonic()
    for _ in range(100):
        lim.wait()
    assert time.monotonic() - t0 < 0.05


def test_api_judge_is_cached(tmp_path):
    with Server() as srv:
        judge = CachedJudge(judge_for(srv), tmp_path / "j.sqlite")
        judge.score(["Q?"], ["true"])
        judge.score(["Q?"], ["true"])
    assert len(srv.requests) == 2  # truth + info once


def test_api_judge_sends_references():
    refs = References({normalise_question("Q?"): (("right",), ("wrong",))})
    with Server() as srv:
        judge_for(srv, references=refs).score_one("Q?", "true")
    truth_prompt = [r for r in srv.requests if "truthful?" in r["messages"][-1]["content"]][0]
    assert "right" in truth_prompt["messages"][-1]["content"] and "wrong" in truth_prompt["messages"][-1]["content"]


def test_api_spec_parsing(tmp_path):
    assert parse_api_spec("gpt-4o-mini@https://api.openai.com/v1") == {
        "model": "gpt-4o-mini", "base_url": "https://api.openai.com/v1", "key_env": "OPENAI_API_KEY"}
    assert parse_api_spec("m@http://127.0.0.1:8000#MY_KEY")["key_env"] == "MY_KEY"
    with pytest.raises(ConfigError, match="api:MODEL@BASE_URL"):
        parse_api_spec("no-url")
    with Server() as srv:
        judge = get_judge(f"api:test-model@{srv.url}", cache=tmp_path / "j.sqlite", rps=0)
        assert judge.score_one("Q?", "true").truth == pytest.approx(0.8)
    assert judge.name.startswith("api:test-model@")
