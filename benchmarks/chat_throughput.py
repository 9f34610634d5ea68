"""``dama infer``'s speed: time to first token and completion tokens/s with one client and with many at once.

    python benchmarks/chat_throughput.py                     # the built-in tiny LLaVA, 32 tokens per answer
    python benchmarks/chat_throughput.py --model dama/tiny-qwen2-vl --clients 16 --max-tokens 64

The script starts a ``dama infer`` server (``python -m worker.infer``: a subprocess with its own temporary home,
artifacts and model cache, and a random secret; ``--max-batch`` and ``--window-ms`` become its
``DAMA_INFER_MAX_BATCH`` and ``DAMA_INFER_BATCH_WINDOW_MS``), waits for ``/health`` and warms it up: the model's
build and load and one round of ``--clients`` requests at once are not timed. Then two modes take turns
``--repeats`` times (a shared machine's neighbours load them alike), each keeping its fastest run:

* ``1 client``: one client sends ``--requests`` requests, one after the other (the baseline);
* ``N clients``: ``--clients`` threads send ``--requests`` requests each, all at once (the server batches them).

Every request is the same user message, an image and a prompt as an evaluation sends them, greedy, streamed with
usage (httpx, one connection per client). TTFT is the time from sending a request to its first text; tokens/s is the
completion tokens the server reports (``usage``) over the mode's wall time. The script checks that every answer is
the same text (a greedy answer may not depend on its batch) and counts the answers that ran to ``max_tokens``.
Prints a table with the ratio of each mode's tokens/s to one client's, then the results as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from worker.serve import wait_until_answering

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the image in detail."
READY_TIMEOUT_S = 300.0


@dataclass
class Answer:
    ttft_s: float
    completion_tokens: int
    finish_reason: str
    text: str


def _image_uri() -> str:
    """A small picture: a red square and a blue bar on white."""
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    image.paste((200, 30, 30), (8, 8, 28, 28))
    image.paste((30, 60, 200), (36, 10, 56, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def infer_server(args: argparse.Namespace, secret: str) -> Iterator[str]:
    """A ``dama infer`` subprocess on a free local port; yields its base URL (its log is printed if it fails). With
    ``--url``: that service, as it is."""
    if args.url:
        yield args.url.rstrip("/")
        return
    with tempfile.TemporaryDirectory(prefix="dama-chat-bench-") as home:
        port = _free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("DAMA_")}
        env.update(
            DAMA_HOME=home,
            DAMA_INFERENCE_SECRET=secret,
            DAMA_MODEL_CACHE_DIR=str(args.model_cache or Path(home) / "models"),
            DAMA_INFER_MAX_BATCH=str(args.max_batch),
            DAMA_INFER_BATCH_WINDOW_MS=str(args.window_ms),
            DAMA_INFER_MAX_CONCURRENT=str(max(64, args.clients * 2)),
            DAMA_CHAT_MAX_TOKENS=str(max(1024, args.max_tokens)),
            DAMA_TORCH_THREADS=os.environ.get("DAMA_TORCH_THREADS", "1"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        log_path = Path(home) / "infer.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker.infer", "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_answering(f"{url}/health", [process], timeout=READY_TIMEOUT_S, log=log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def ask(client: httpx.Client, body: dict[str, Any]) -> Answer:
    """One streamed request: the time to its first text, its usage and its text."""
    started = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict[str, int] = {}
    finish = ""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    parts.append(text)
                finish = choice.get("finish_reason") or finish
    text = "".join(parts)
    return Answer(ttft if ttft is not None else time.perf_counter() - started, usage["completion_tokens"], finish, text)


def run_mode(url: str, secret: str, body: dict[str, Any], clients: int, requests: int) -> tuple[float, list[Answer]]:
    """``clients`` threads sending ``requests`` requests each, at once; (wall seconds, answers)."""
    answers: list[Answer] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_thread() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=300) as client:
            ask(client, {**body, "max_tokens": 1})  # connect first: the timed run measures no handshake
            start.wait()
            try:
                mine = [ask(client, body) for _ in range(requests)]
            except BaseException as error:
                with lock:
                    errors.append(error)
                return
            with lock:
                answers.extend(mine)

    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]}")
    return seconds, answers


def measure(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(24)
    body = {
        "model": args.model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _image_uri()}},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    modes = {"1 client": 1, f"{args.clients} clients": args.clients}
    if args.url:  # a running service (the API's /v1, as tenants call it): its key instead of a backend's secret
        secret = args.key or os.environ.get("DAMA_API_KEY", "")
    with infer_server(args, secret) as url:
        started = time.perf_counter()
        run_mode(url, secret, body, 1, 1)  # builds and loads the model
        load_s = time.perf_counter() - started
        run_mode(url, secret, body, args.clients, 1)  # a batch of every size on the way up
        runs: dict[str, list[tuple[float, list[Answer]]]] = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, clients in modes.items():
                runs[name].append(run_mode(url, secret, body, clients, args.requests))
    results: dict[str, Any] = {}
    texts: set[str] = set()
    for name, clients in modes.items():
        rates = [sum(a.completion_tokens for a in answers) / seconds for seconds, answers in runs[name]]
        seconds, answers = runs[name][rates.index(max(rates))]
        texts |= {answer.text for run in runs[name] for answer in run[1]}
        ttfts = sorted(answer.ttft_s for answer in answers)
        results[name] = {
            "clients": clients,
            "requests": len(answers),
            "seconds": round(seconds, 3),
            "completion_tokens": sum(answer.completion_tokens for answer in answers),
            "tokens_per_s": round(max(rates), 1),
            "all_tokens_per_s": [round(rate, 1) for rate in rates],
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p90_ms": round(1000 * ttfts[int(0.9 * (len(ttfts) - 1))], 1),
            "ran_to_max_tokens": sum(answer.finish_reason == "length" for answer in answers),
        }
    base = results["1 client"]["tokens_per_s"]
    for row in results.values():
        row["ratio"] = round(row["tokens_per_s"] / base, 2)
    return {
        "model": args.model,
        "through": "the API at --url" if args.url else "dama infer alone",
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "window_ms": args.window_ms,
        "repeats": args.repeats,
        "model_build_and_load_s": round(load_s, 2),
        "answers_identical": len(texts) == 1,
        "threads": int(os.environ.get("DAMA_TORCH_THREADS", "1")),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_after": [round(load, 2) for load in os.getloadavg()],
        "modes": results,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'mode':<12} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'ratio':>6} "
        f"{'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'to max':>7}"
    ]
    for name, row in results["modes"].items():
        lines.append(
            f"{name:<12} {row['requests']:>8} {row['completion_tokens']:>7} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>9.1f} {row['ratio']:>6.2f} {row['ttft_p50_ms']:>12.1f} {row['ttft_p90_ms']:>12.1f} "
            f"{row['ran_to_max_tokens']:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dama/tiny-llava", help="what requests name (default dama/tiny-llava)")
    parser.add_argument("--clients", type=int, default=8, help="clients at once in the batched mode")
    parser.add_argument("--requests", type=int, default=16, help="requests per client and mode")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8, help="DAMA_INFER_MAX_BATCH of the server")
    parser.add_argument("--window-ms", type=float, default=10.0, help="DAMA_INFER_BATCH_WINDOW_MS of the server")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, in turns; the fastest counts")
    parser.add_argument("--model-cache", type=Path, help="a model cache to reuse (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--url",
        help="measure a running service instead of starting `dama infer`: its base URL without /v1 (e.g. the API "
        "of `dama serve`, http://127.0.0.1:8000, with a chat rate limit that admits the run)",
    )
    parser.add_argument("--key", help="with --url: the API key (default DAMA_API_KEY)")
    args = parser.parse_args(argv)
    results = measure(args)
    print(table(results))
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["answers_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
