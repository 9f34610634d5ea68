"""Objects for images without labels (``dama_engine.pairs.labels``): the judge's reply split into names and matched
onto the vocabulary (hand-worked cases), the client's pinned address, error statuses and replies that are no chat
completion, and a pair generation on a prompt set whose judge is a real HTTP server on loopback speaking the OpenAI
chat API (the external judge is the one thing replaced; the project's own inference server as the judge:
tests/e2e/test_pairs_loop_e2e.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock, Thread
from typing import Any, ClassVar

import pytest
from PIL import Image

from dama_engine.data import Vocabulary, judge_response
from dama_engine.data.generative import GenerativeEvalError, load_generative_eval
from dama_engine.evaluation.judge import JudgeConfig, JudgeError, chat_completion
from dama_engine.models import build_tiny_model
from dama_engine.pairs import generate_pairs, parse_pairs_config
from dama_engine.pairs.labels import (
    ImageObjects,
    ObjectJudgeConfig,
    failure_text,
    group_by_image,
    label_prompts,
    labels_report,
    match_names,
    parse_object_list,
)
from dama_engine.pairs.run import JudgeUnavailableError
from tests.engine.test_pairs import NOUNS, Recorder, _generative_set, _records, _settings


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llava", tmp_path_factory.mktemp("labels-model") / "llava", seed=0)


def test_parse_object_list() -> None:
    assert parse_object_list("red circle, blue square") == ["red circle", "blue square"]
    assert parse_object_list("1. A dog\n2) two cats\n- a lamp.\n* sky") == ["A dog", "two cats", "a lamp", "sky"]
    assert parse_object_list("a cup and a plate; a bowl, ") == ["a cup", "a plate", "a bowl"]
    # "and" only as a word: "sand" and "handbag" stay whole.
    assert parse_object_list("sand, handbag") == ["sand", "handbag"]
    assert parse_object_list("  \n , ;") == []


def test_names_are_matched_onto_entries_synonyms_and_plurals() -> None:
    vocabulary = Vocabulary.from_mapping({"dog": ["puppy"], "traffic light": ["stoplight"], "car": []})
    objects, unmatched = match_names(["two puppies", "a stoplight", "Sky", "cars", "a dog", "big  Clouds"], vocabulary)
    assert objects == ("dog", "traffic light", "car")  # distinct, in order of first mention
    assert unmatched == ("sky", "big clouds")  # normalized: lower case, single spaces
    assert match_names(["a dog next to a car"], vocabulary) == (("dog", "car"), ())  # one name, two objects


def test_the_labels_report_counts_each_image_once() -> None:
    first = ImageObjects(("dog",), ("sky", "sky", "grass"), "dog, sky, sky, grass")
    second = ImageObjects(("car", "dog"), ("sky",), "car, dog, sky")
    failed = ImageObjects((), (), "", error="JudgeError: judge j: answered HTTP 500")
    found = {"a": first, "b": first, "c": second, "d": failed}  # prompts a and b share an image
    report = labels_report(found, model="m", name="j")
    assert report["images"] == 3 and report["failed_images"] == 1 and report["prompts_skipped"] == 1
    assert report["first_error"] == "JudgeError: judge j: answered HTTP 500"
    assert report["objects_matched"] == 3 and report["objects_per_image"] == 1.5  # (1 + 2) / 2 answered images
    assert report["names_unmatched"] == 4  # sky, sky, grass, sky
    assert report["most_common_unmatched"] == [{"name": "sky", "images": 2}, {"name": "grass", "images": 1}]
    assert report["images_without_objects"] == 0 and (report["name"], report["model"]) == ("j", "m")


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: answers ``reply`` (or the status ``status``), records what it was sent."""

    reply: ClassVar[str] = ""
    delay: ClassVar[float] = 0.0
    status: ClassVar[int] = 200
    raw: ClassVar[bytes | None] = None
    seen: ClassVar[list[dict[str, Any]]] = []
    lock = Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).seen.append({"host": self.headers.get("Host"), "path": self.path, "body": body})
        time.sleep(type(self).delay)
        payload = type(self).raw or json.dumps({"choices": [{"message": {"content": type(self).reply}}]}).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def judge_port() -> Iterator[int]:
    _Judge.reply, _Judge.delay, _Judge.status, _Judge.raw, _Judge.seen = "", 0.0, 200, None, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


def test_the_client_connects_to_the_pinned_address_and_refuses_what_is_no_chat_completion(judge_port: int) -> None:
    # A host that resolves nowhere (.invalid), reached at the address the caller checked: the request names the host.
    config = JudgeConfig(url=f"http://judge.invalid:{judge_port}/v1", model="m", name="shapes")
    _Judge.reply = "a dog"
    assert chat_completion(config, [{"role": "user", "content": "hi"}], connect_to="127.0.0.1") == "a dog"
    assert _Judge.seen[0]["host"] == f"judge.invalid:{judge_port}" and _Judge.seen[0]["path"] == "/v1/chat/completions"

    local = JudgeConfig(url=f"http://127.0.0.1:{judge_port}/v1", model="m", name="shapes")
    _Judge.status = 503
    with pytest.raises(JudgeError, match="judge shapes: answered HTTP 503"):
        chat_completion(local, [])
    _Judge.status, _Judge.raw = 200, b'{"error": "nope"}'
    with pytest.raises(JudgeError, match="not a chat completion"):
        chat_completion(local, [])


def _prompt_set(folder: Path, prompts: int) -> tuple[Path, Path]:
    """The pair tests' generative set (3 images behind ``prompts`` prompts) with its objects taken out."""
    data, vocabulary = _generative_set(folder, prompts=prompts)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "objects"}) + "\n" for row in rows))
    return data, vocabulary


def test_a_prompt_set_needs_a_judge_and_a_labelled_set_refuses_one(tmp_path: Path) -> None:
    data, vocabulary = _prompt_set(tmp_path / "prompts", prompts=2)
    with pytest.raises(GenerativeEvalError, match="objects: missing"):
        load_generative_eval(data, vocabulary)
    assert [s.objects for s in load_generative_eval(data, vocabulary, labelled=False).samples] == [(), ()]
    labelled, labelled_vocabulary = _generative_set(tmp_path / "labelled", prompts=2)
    with pytest.raises(GenerativeEvalError, match="a prompt set carries no objects"):
        load_generative_eval(labelled, labelled_vocabulary, labelled=False)


def test_pairs_on_a_prompt_set_judged_against_the_objects_the_judge_lists(
    tiny_llava: Path, judge_port: int, tmp_path: Path
) -> None:
    data = _prompt_set(tmp_path / "set", prompts=6)
    # Every image "shows" the even-numbered nouns (the random model names nouns at random: pairs come out), and
    # two names of no vocabulary entry.
    listed = NOUNS[::2]
    _Judge.reply = "\n".join(f"- {name}" for name in listed) + "\n- sky\n- a gleaming zeppelin"
    settings = _settings(tiny_llava, data, tmp_path / "out")
    settings["judge"] = {"url": f"http://judge.invalid:{judge_port}/v1", "model": "lister", "name": "local"}
    recorder = Recorder()
    result = generate_pairs(parse_pairs_config(settings), recorder, judge_address="127.0.0.1")
    assert result.output is not None and result.pairs > 0
    assert recorder.stages == ["validating", "listing_objects", "loading_model", "generating", "writing"]
    assert ("listing_objects", 3, 3) in recorder.progress
    assert len(_Judge.seen) == 3  # one request per distinct image, not per prompt
    content = _Judge.seen[0]["body"]["messages"][0]["content"]
    assert (
        content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        and "List every object" in content[1]["text"]
    )
    judge = result.report["judge"]
    assert (judge["images"], judge["failed_images"], judge["prompts_skipped"]) == (3, 0, 0)
    assert judge["objects_per_image"] == len(listed) and judge["names_unmatched"] == 6
    assert judge["most_common_unmatched"] == [
        {"name": "a gleaming zeppelin", "images": 3},
        {"name": "sky", "images": 3},
    ]
    # The samples were judged against the listed objects: the pairs hold by the test's own matcher run.
    vocabulary = Vocabulary.load(data[1])
    samples = _records(result.output.samples_path)
    assert all(sample["objects"] == listed for sample in samples)
    for row in _records(result.output.dataset_path):
        assert row["objects"] == listed
        assert not judge_response(row["chosen"][0]["content"], listed, vocabulary).hallucinated
        assert judge_response(row["rejected"][0]["content"], listed, vocabulary).hallucinated


def test_a_judge_that_answers_for_no_image_stops_the_run_before_the_model_loads(
    judge_port: int, tmp_path: Path
) -> None:
    data = _prompt_set(tmp_path / "set", prompts=3)
    _Judge.status = 500
    settings = _settings(tmp_path / "no-model", data, tmp_path / "out")
    settings["judge"] = {"url": f"http://127.0.0.1:{judge_port}/v1", "model": "lister", "name": "local"}
    recorder = Recorder()
    with pytest.raises(JudgeUnavailableError, match=r"none of the 3 images.*answered HTTP 500"):
        generate_pairs(parse_pairs_config(settings), recorder)
    assert recorder.stages == ["validating", "listing_objects"] and not (tmp_path / "out").exists()


def test_a_stop_while_the_judge_lists_writes_nothing(judge_port: int, tmp_path: Path) -> None:
    data = _prompt_set(tmp_path / "set", prompts=6)
    _Judge.reply = "cat, dog"
    settings = _settings(tmp_path / "no-model", data, tmp_path / "out")
    settings["judge"] = {"url": f"http://127.0.0.1:{judge_port}/v1", "model": "lister", "concurrency": 1}
    recorder = Recorder(stop_after=1)  # asks to stop once the first image is listed
    result = generate_pairs(parse_pairs_config(settings), recorder)
    assert result.stopped and result.output is None and not (tmp_path / "out").exists()
    assert recorder.stages == ["validating", "listing_objects"] and recorder.progress == [("listing_objects", 1, 3)]


def test_a_cancel_raised_by_the_progress_hook_sends_no_further_request(judge_port: int, tmp_path: Path) -> None:
    """The worker's reporter raises to cancel a run (JobStopped) from inside the progress hook: the requests not
    yet sent are dropped, not sent to the judge one by one while the run winds down."""
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    lines = []
    for index in range(12):  # twelve distinct images
        Image.new("RGB", (16, 16), (20 * index, 10, 200 - 10 * index)).save(folder / "images" / f"{index}.png")
        lines.append(json.dumps({"id": f"p{index}", "image": f"images/{index}.png", "prompt": "Describe."}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "vocabulary.json").write_text(json.dumps({"cat": []}))
    prompts = load_generative_eval(folder / "prompts.jsonl", folder / "vocabulary.json", labelled=False).samples
    _Judge.reply, _Judge.delay = "cat", 0.5
    config = ObjectJudgeConfig(url=f"http://127.0.0.1:{judge_port}/v1", model="m", concurrency=2)

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        label_prompts(config, group_by_image(prompts), Vocabulary.from_mapping({"cat": []}), progress=cancel)
    time.sleep(1.5)  # what was in flight ends; nothing more may start
    # Each of the 2 threads may have taken one more image as its first ended, before the cancel dropped the queue:
    # at most 2 x concurrency requests of the 12, where waiting for the queue sent all 12.
    assert len(_Judge.seen) <= 2 * config.concurrency


def test_a_failure_never_quotes_the_judges_key() -> None:
    import httpx

    assert JudgeConfig(url="http://j/v1", model="m", api_key=" sk-secret\n").api_key == "sk-secret"
    with pytest.raises(ValueError, match="control character"):
        JudgeConfig(url="http://j/v1", model="m", api_key="sk-\x00secret")
    config = JudgeConfig(url="http://j/v1", model="m", api_key="sk-secret")
    refused = failure_text(httpx.LocalProtocolError("Illegal header value b'Bearer sk-secret'"), config)
    assert "sk-secret" not in refused and refused.startswith("LocalProtocolError")
    echoed = failure_text(JudgeError("judge j: the server said: bad key sk-secret"), config)
    assert "sk-secret" not in echoed and "[api key]" in echoed
