"""The optional judge, against a real HTTP server on loopback that speaks the OpenAI chat API (the external
service is the one thing replaced: it is a true edge)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from dama_engine.data.generative import load_generative_eval
from dama_engine.evaluation.judge import JudgeConfig, judge_answers, parse_rating
from dama_engine.proving.shapes import make_demo_dataset


class _Judge(BaseHTTPRequestHandler):
    replies: ClassVar[list[str]] = []
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        reply = type(self).replies.pop(0)
        if reply == "500":
            self.send_response(500)
            self.end_headers()
            return
        if reply == "redirect":  # to a path of this same server that would rate 6: never asked
            self.send_response(307)
            self.send_header("Location", "/v1/elsewhere/chat/completions")
            self.end_headers()
            return
        if reply == "huge":
            reply = "Rating: 6 " + "x" * 3_000
        if reply == "drip":  # a valid reply, sent a few bytes at a time over 3 s
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Rating: 6"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            step = len(payload) // 10 + 1
            try:
                for start in range(0, len(payload), step):
                    self.wfile.write(payload[start : start + step])
                    self.wfile.flush()
                    time.sleep(0.3)
            except BrokenPipeError:  # the judge gave up on it, as it should
                pass
            return
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Judge.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_parse_rating() -> None:
    assert parse_rating("Rating: 5") == 5
    assert parse_rating("rating=0.") == 0
    assert parse_rating("I would say 4") == 4
    assert parse_rating("between 3 and 4") is None
    assert parse_rating("Rating: 9") is None


def test_judge_rates_answers_and_counts_failures(judge_url: str, tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path, n_train=0, n_eval=0, n_generative=4)
    samples = load_generative_eval(data.generative_eval, data.vocabulary).samples
    # Ratings 6 and 2, then a reply with no rating, then a server error: 2 rated, 2 failures.
    _Judge.replies = ["Rating: 6", "Rating: 2", "no idea", "500"]
    config = JudgeConfig(url=judge_url, model="judge-model", api_key="secret")
    done: list[int] = []
    result = judge_answers(config, samples, ["a", "b", "c", "d"], progress=lambda i, n: done.append(i))
    assert result["ratings"] == [6, 2, None, None]
    assert result["score"] == 4.0  # (6 + 2) / 2
    assert result["hallucination_rate"] == 0.5  # the 2 is below 3
    assert (result["rated"], result["failures"]) == (2, 2)
    assert done == [1, 2, 3, 4]
    first = _Judge.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0
    content = first["body"]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert samples[0].prompt in content[1]["text"] and "Answer: a" in content[1]["text"]
    assert ", ".join(samples[0].objects) in content[1]["text"]


def test_the_judge_follows_no_redirect_and_reads_no_reply_too_long_or_too_slow(judge_url: str, tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path, n_train=0, n_eval=0, n_generative=4)
    samples = load_generative_eval(data.generative_eval, data.vocabulary).samples
    _Judge.replies = ["redirect", "huge", "drip", "Rating: 5"]
    config = JudgeConfig(url=judge_url, model="judge-model", timeout_s=1.0, max_response_bytes=2_000)
    started = time.monotonic()
    result = judge_answers(config, samples, ["a", "b", "c", "d"])
    assert result["ratings"] == [None, None, None, 5]
    assert [seen["path"] for seen in _Judge.seen] == ["/v1/chat/completions"] * 4  # the redirect was not followed
    assert time.monotonic() - started < 2.9  # the dripping reply was dropped after about timeout_s
