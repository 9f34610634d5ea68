"""The web console in a real browser (Debian's headless Chromium via Selenium) against the real service: sign in,
upload datasets (one hostile, one invalid), start a job from the form, watch it to 100% with charts that hold
data, download the adapter, compare two jobs, ask the base and the tuned job the same question in the playground
(both answers streamed side by side, then judged against the row's objects), follow an evaluation and a pair
generation to their reports and a loop to its rounds' figures, open the API docs; then check that no request left
the host and that the key is in no URL the browser requested and nowhere in the server's access log.

Set DAMA_CONSOLE_SCREENSHOTS=docs/images to refresh the README's screenshots.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from dama_engine.proving.shapes import COLOURS, SHAPES, make_demo_dataset
from tests.api.test_pair_generations import _archive
from tests.console.browser import NetworkLog, chromium
from tests.console.conftest import Service
from tests.engine.test_pairs import _generative_set

pytestmark = pytest.mark.slow

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
XSS_NAME = '<img src=x onerror="window.__xss=1">.zip'
XSS_PROMPT = "<script>window.__xss=2</script> What is in this picture?"
XSS_CHOSEN = '<img src=x onerror="window.__xss=3"> a shape'
ENDED = {"succeeded", "failed", "cancelled"}
HYPERPARAMETERS = {"learning_rate": 0.005, "batch_size": 8, "epochs": 2, "max_length": 256, "checkpoint_every": 4}


def _zip(folder: Path, data_file: Path, images: Path, rewrite: Callable[[list[dict[str, Any]]], None]) -> Path:
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    rewrite(rows)
    target = folder / f"{data_file.stem}.zip"
    with zipfile.ZipFile(target, "w") as bundle:
        bundle.writestr(data_file.name, "\n".join(json.dumps(row) for row in rows))
        for image in sorted(images.glob(f"{data_file.stem}_*")):
            bundle.write(image, f"images/{image.name}")
    return target


def _hostile(rows: list[dict[str, Any]]) -> None:
    rows[0]["prompt"][0]["content"][1]["text"] = XSS_PROMPT
    rows[0]["chosen"][0]["content"] = XSS_CHOSEN


def _broken(rows: list[dict[str, Any]]) -> None:
    del rows[1]["rejected"]


def _scenes(folder: Path) -> Path:
    """A generative set of 4 shapes scenes (rows with their objects, and the vocabulary), zipped to upload."""
    demo = make_demo_dataset(folder, n_train=0, n_eval=0, n_generative=4, image_size=64)
    target = folder / "scenes.zip"
    with zipfile.ZipFile(target, "w") as bundle:
        for path in (demo.generative_eval, demo.vocabulary):
            bundle.write(path, path.name)
        for image in sorted(demo.images_dir.glob("gen_*")):
            bundle.write(image, f"images/{image.name}")
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("console-data")
    demo = make_demo_dataset(folder / "demo", n_train=32, n_eval=8, n_generative=0, image_size=32, with_hardness=True)
    _generative_set(folder / "prompts", prompts=6)  # the random tiny model's samples make pairs on it
    (folder / "prompts.zip").write_bytes(_archive(folder / "prompts"))
    return {
        "prompts": folder / "prompts.zip",
        "scenes": _scenes(folder / "scenes"),
        "train": _zip(folder, demo.train, demo.images_dir, _hostile),
        "eval": _zip(folder, demo.eval, demo.images_dir, lambda rows: None),
        "broken": _zip(folder / "demo", demo.train, demo.images_dir, _broken),
    }


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, NetworkLog, Path]]:
    downloads = tmp_path_factory.mktemp("downloads")
    with chromium(downloads) as driver:
        yield driver, NetworkLog(driver), downloads


def wait(driver: Any, predicate: Callable[[Any], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate(driver)
        except Exception:  # an element replaced while the page redraws: look again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; page: {driver.find_element('tag name', 'body').text[:2000]}"
            )
        time.sleep(0.2)


def css(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements("css selector", selector))


def screenshot(driver: Any, name: str) -> None:
    folder = os.environ.get("DAMA_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"console-{name}.png"))


def chart_points(driver: Any, scope: str) -> list[int]:
    """Per chart in ``scope``: the points drawn (path vertices and dots), read from the SVG itself."""
    return driver.execute_script(
        """
        return [...document.querySelectorAll(arguments[0] + ' svg.plot')].map((svg) =>
          [...svg.querySelectorAll('path.line')]
            .reduce((n, p) => n + (p.getAttribute('d').match(/[ML]/g) || []).length, 0)
          + svg.querySelectorAll('circle.dot, circle.ring, rect.bar').length);
        """,
        scope,
    )


def sign_in(driver: Any, service: Service) -> None:
    driver.get(f"{service.url}/")
    wait(driver, lambda d: d.current_url.startswith(f"{service.url}/console/") and css(d, "#api-key"), what="sign-in")
    assert not css(driver, "#nav")[0].is_displayed() and not css(driver, "#sign-out")[0].is_displayed()
    screenshot(driver, "sign-in")
    css(driver, "#api-key")[0].send_keys(service.key)
    css(driver, "#sign-in button")[0].click()
    wait(driver, lambda d: css(d, "#jobs-table") or "No jobs match" in d.find_element("id", "main").text, what="jobs")


def upload(driver: Any, path: Path, name: str = "") -> None:
    driver.get(driver.current_url.split("#")[0] + "#/datasets")
    wait(driver, lambda d: css(d, "#upload-file"), what="upload form")
    if name:
        css(driver, "#upload-name")[0].send_keys(name)
    css(driver, "#upload-file")[0].send_keys(str(path))
    css(driver, "#upload-form button[type=submit]")[0].click()


def check_dataset_page(driver: Any, dataset_id: str) -> None:
    driver.get(driver.current_url.split("#")[0] + f"#/datasets/{dataset_id}")
    wait(driver, lambda d: len(css(d, "#samples article.sample")) >= 5, what="sample rows")
    assert css(driver, "#dataset-name")[0].text == XSS_NAME  # shown as text, not parsed
    assert css(driver, "#dataset-format")[0].text == "trl" and css(driver, "#dataset-rows")[0].text == "32"
    first = css(driver, '#samples article.sample[data-row="1"]')[0].text
    assert XSS_PROMPT in first and XSS_CHOSEN in first
    assert driver.execute_script("return window.__xss") is None
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"], main script').length") == 0
    # every sample image arrived through fetch (with the key) and decoded
    wait(
        driver,
        lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('img.thumb')];"
            "return imgs.length >= 5 && imgs.every((i) => i.src.startsWith('blob:') && i.complete"
            " && i.naturalWidth > 0);"
        ),
        what="sample images",
    )
    assert "32 of 32 rows valid" in css(driver, "#validation")[0].text
    css(driver, "#more-rows")[0].click()
    wait(driver, lambda d: len(css(d, "#samples article.sample")) == 24, what="more sample rows")
    assert chart_points(driver, "#hardness")[0] >= 2  # histogram bars
    screenshot(driver, "dataset")


def fill_job_form(driver: Any, dataset_id: str, eval_id: str, learning_rate: str, button: str = "#create-job") -> None:
    def field(param: str) -> Any:
        return css(driver, f'[data-param="{param}"]')[0]

    Select(field("dataset_id")).select_by_value(dataset_id)
    Select(field("evaluation.dataset_id")).select_by_value(eval_id)
    for name, value in {**HYPERPARAMETERS, "learning_rate": learning_rate}.items():
        field(f"hyperparameters.{name}").clear()
        field(f"hyperparameters.{name}").send_keys(str(value))
    css(driver, button)[0].click()


def check_estimate(driver: Any, dataset_id: str, eval_id: str) -> None:
    """The form's Estimate button shows what the job would take (the service's worker answers it) and starts
    nothing: the page stays on the form."""
    form_url = driver.current_url
    fill_job_form(driver, dataset_id, eval_id, learning_rate="0.005", button="#estimate-job")
    peak = wait(driver, lambda d: css(d, "#estimate-peak"), timeout=60, what="the estimate")[0]
    assert re.match(r"\d[\d.e-]* GiB \(", peak.text), peak.text
    parts = css(driver, "#estimate-parts")[0].text  # the parts, with the rule that makes the peak of them
    assert "weights " in parts and "max(activations, gradients)" in parts, parts
    # the console service names no GPU memory or kind: no fit claimed, no time
    assert css(driver, "#estimate-fits")[0].text.startswith("unknown")
    assert css(driver, "#estimate-time")[0].text.startswith("unknown")
    assert re.match(r"\d+ \(", css(driver, "#estimate-steps")[0].text)
    assert "per pair on average" in css(driver, "#estimate-tokens")[0].text
    assert len(css(driver, "#estimate-options tbody tr")) >= 2
    assert driver.current_url == form_url
    screenshot(driver, "new-job-estimate")


def create_job(driver: Any, dataset_id: str, eval_id: str) -> str:
    driver.get(driver.current_url.split("#")[0] + "#/jobs/new")
    wait(driver, lambda d: css(d, '[data-param="hyperparameters.learning_rate"]'), what="job form")
    # the schema's defaults and bounds are on the form
    rate = css(driver, '[data-param="hyperparameters.learning_rate"]')[0]
    assert float(rate.get_attribute("value")) == 2e-5
    hint = css(driver, '.field[data-field="hyperparameters.learning_rate"] .hint')[0].text
    assert "default 0.00002" in hint and "> 0" in hint
    assert css(driver, '[data-param="hyperparameters.batch_size"]')[0].get_attribute("max") == "1024"
    assert css(driver, '[data-param="method"]')[0].get_attribute("value") == "dama"
    # the server's error lands on the field it names
    fill_job_form(driver, dataset_id, eval_id, learning_rate="-1")
    error = wait(
        driver,
        lambda d: css(d, '.field.invalid[data-field="hyperparameters.learning_rate"] .field-error'),
        what="field error",
    )[0]
    assert "greater than 0" in error.text
    screenshot(driver, "new-job")
    check_estimate(driver, dataset_id, eval_id)
    fill_job_form(driver, dataset_id, eval_id, learning_rate="0.005")
    match = wait(driver, lambda d: re.search(r"#/jobs/(job_\w+)$", d.current_url), what="job page")
    return str(match.group(1))


def watch_job(driver: Any) -> None:
    seen: set[str] = set()

    def ended(d: Any) -> bool:
        progress = css(d, "#job-progress")
        badge = css(d, "#job-header .badge")
        if progress and badge:
            seen.add(badge[0].text)
            percent = float(progress[0].get_attribute("data-percent"))
            if 0 < percent < 100:
                seen.add("partial")
            return badge[0].text in ENDED and percent == 100.0
        return False

    wait(driver, ended, timeout=300, what="the job to finish")
    assert css(driver, "#job-header .badge")[0].text == "succeeded"
    assert "running" in seen, seen  # the page followed the job while it ran
    wait(driver, lambda d: "succeeded" in css(d, "#events")[0].text, what="the last event")
    events = css(driver, "#events li")
    assert len(events) >= 8 and "stage training" in css(driver, "#events")[0].text
    points = chart_points(driver, "#charts")
    assert len(points) == 6 and all(count >= 2 for count in points), points  # loss ... kept share, all with data
    assert len(css(driver, "#held-out tbody tr")) >= 2  # before and after training
    first = driver.execute_script(
        "return [...document.querySelector('#held-out tbody tr').cells].map(c => c.textContent)"
    )
    assert first[0] == "0" and float(first[-1]) > 0, first  # the log-prob "before" is measured, not 0 by construction
    assert first[2:4] == ["-", "-"], first  # the implicit reward is 0 by construction at step 0: no figure shown
    assert css(driver, "#job-stage")[0].text == "-"  # an ended job has no current stage, never a stale one
    assert "stage stage" not in css(driver, "#events")[0].text
    assert "overall" in css(driver, "#base-vs-tuned table")[0].text
    screenshot(driver, "job")


def download_adapter(driver: Any, downloads: Path) -> None:
    css(driver, "#download-adapter")[0].click()
    message = wait(driver, lambda d: css(d, "#download-done"), what="download")[0].text
    archive = wait(driver, lambda d: [p for p in downloads.glob("*.tar.gz") if p.stat().st_size], what="file")[0]
    time.sleep(0.5)  # the file is renamed into place once complete
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in message
    with tarfile.open(archive) as bundle:
        assert any(name.endswith("adapter_config.json") for name in bundle.getnames())


def compare(driver: Any, job_ids: list[str]) -> None:
    driver.get(driver.current_url.split("#")[0] + "#/jobs")
    wait(driver, lambda d: len(css(d, "#jobs-table input[type=checkbox]")) == 2, what="two jobs")
    Select(css(driver, "#filter-method")[0]).select_by_value("dpo")
    wait(driver, lambda d: len(css(d, "#jobs-table tbody tr")) == 1, what="filtered list")
    Select(css(driver, "#filter-method")[0]).select_by_value("")
    wait(driver, lambda d: len(css(d, "#jobs-table tbody tr")) == 2, what="unfiltered list")
    for box in css(driver, "#jobs-table input[type=checkbox]"):
        box.click()
    screenshot(driver, "jobs")
    css(driver, "#compare-selected")[0].click()
    wait(driver, lambda d: len(css(d, "#compare-table tbody tr")) == 2, what="compare table")
    assert set(job_ids) <= set(driver.current_url.split("ids=")[1].split(","))
    lines = driver.execute_script(
        "return document.querySelectorAll('#compare-charts figure:first-child path.line').length"
    )
    assert lines == 2  # both jobs' loss on one chart
    points = chart_points(driver, "#compare-charts")
    assert all(count >= 4 for count in points), points
    # Held-out points of equal value stay visible: each job's dots are a ring of its own size.
    radii = driver.execute_script(
        "const f = [...document.querySelectorAll('#compare-charts figure')].find("
        "  x => x.querySelector('figcaption').textContent === 'held-out log-prob accuracy');"
        "return [...new Set([...f.querySelectorAll('circle')].map(c => c.getAttribute('r')))]"
    )
    assert len(radii) == 2, radii
    screenshot(driver, "compare")


def check_playground(driver: Any, service: Service, api: httpx.Client, job_ids: list[str], scenes: Path) -> None:
    """The base on the left and the DAMA job on the right asked about a generative row's image: both answers
    stream into their columns, then the CHAIR matcher's judgement marks them."""
    service.wait_for_infer()
    uploaded = api.post("/datasets", files={"file": ("scenes.zip", scenes.read_bytes())}, data={"format": "generative"})
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]
    row = api.get(f"/datasets/{dataset_id}/rows", params={"offset": 1, "limit": 1}).json()["data"][0]
    driver.get(driver.current_url.split("#")[0] + "#/playground")
    wait(driver, lambda d: css(d, "#playground-image")[0].get_attribute("src"), what="the playground's first row")
    assert css(driver, 'a[data-nav="playground"]')[0].get_attribute("class") == "active"
    left, right = Select(css(driver, "#playground-left")[0]), Select(css(driver, "#playground-right")[0])
    # defaults: a base on the left, the newest tuned model (the DPO job, created second) on the right
    assert left.first_selected_option.get_attribute("value") == "dama/tiny-llava"
    assert right.first_selected_option.get_attribute("value") == job_ids[1]
    right.select_by_value(job_ids[0])
    Select(css(driver, "#playground-dataset")[0]).select_by_value(dataset_id)
    css(driver, "#playground-row")[0].clear()
    css(driver, "#playground-row")[0].send_keys("2", Keys.TAB)
    wait(
        driver,
        lambda d: (
            css(d, "#playground-prompt")[0].get_attribute("value") == row["prompt"]
            and "row 2 " in css(d, "#playground-image-note")[0].text
            and d.execute_script("const i = document.getElementById('playground-image');return i.naturalWidth > 0")
        ),
        what="row 2's image and prompt",
    )
    css(driver, "#playground-max-tokens")[0].clear()
    css(driver, "#playground-max-tokens")[0].send_keys("16")
    css(driver, "#playground-ask")[0].click()
    done = '#playground-answer-{} .playground-answer[data-state="done"]'
    wait(driver, lambda d: css(d, done.format("left")) and css(d, done.format("right")), timeout=120, what="answers")
    answers = {side: css(driver, done.format(side))[0].text.strip() for side in ("left", "right")}
    assert all(answers.values()), answers
    assert css(driver, "#playground-answer-right h2")[0].text == job_ids[0]
    marks = wait(driver, lambda d: css(d, "#playground-marks[data-state]"), timeout=60, what="the judgement")[0]
    assert marks.get_attribute("data-state") == "done", marks.text
    assert "CHAIR matcher, run by the inference backend" in marks.text
    objects = set(row["objects"])
    assert set(css(driver, "#playground-objects")[0].text.split(": ", 1)[1].split(", ")) == objects

    def listed(side: str, kind: str) -> set[str]:
        text = css(driver, f"#playground-answer-{side} .judged-{kind}")[0].text.split(": ", 1)[1]
        return set() if text == "none" else set(text.split(", "))

    for side in ("left", "right"):
        assert listed(side, "covered") | listed(side, "missed") == objects, side
        assert not listed(side, "covered") & listed(side, "missed"), side
        marked = css(driver, f"#playground-answer-{side} mark.mention.hallucinated")
        assert {mark.get_attribute("data-object") for mark in marked} <= listed(side, "hallucinated"), side
    # No screenshot: the random models name no objects; docs/images/console-playground.png shows the demo's seeing
    # base and its DAMA job on a held-out scene.
    # The tiny random models name no objects: the page's marking is checked on a written answer, judged by the
    # service (its offsets count code points: the emoji before the mentions is one character there, two in JS).
    present = row["objects"][0]
    absent = next(f"{c} {shape}" for c in COLOURS for shape in SHAPES if f"{c} {shape}" not in objects)
    answer = f"\N{EYES} I see a {present} and a {absent}."
    marked = driver.execute_async_script(
        """
        const [datasetId, row, answer, done] = arguments;
        Promise.all([import("/console/static/api.js"), import("/console/static/pages/playground.js")])
          .then(async ([{ api }, { markedAnswer }]) => {
            const body = { dataset_id: datasetId, row, answers: [answer] };
            const result = await api("/playground/judge", { method: "POST", json: body });
            const p = document.createElement("p");
            p.append(...markedAnswer(answer, result.judgements[0]));
            const marks = [...p.querySelectorAll("mark")].map((m) => [m.className, m.textContent]);
            done({ text: p.textContent, marks });
          })
          .catch((error) => done({ error: String(error) }));
        """,
        dataset_id,
        2,
        answer,
    )
    assert marked.get("text") == answer, marked
    assert marked["marks"] == [["mention grounded", present], ["mention hallucinated", absent]], marked
    # an image file instead: read in the page (a data URI for the request), shown as a blob: URL
    css(driver, "#playground-source-file")[0].click()
    css(driver, "#playground-file")[0].send_keys(str(scenes.parent / "images" / "gen_00000.png"))
    wait(
        driver,
        lambda d: (
            "gen_00000.png" in css(d, "#playground-image-note")[0].text
            and css(d, "#playground-image")[0].get_attribute("src").startswith("blob:")
        ),
        what="the uploaded image",
    )
    # a job page can link here with both models chosen
    driver.get(driver.current_url.split("#")[0] + f"#/playground?left={job_ids[1]}&right={job_ids[0]}")
    wait(
        driver,
        lambda d: (
            Select(css(d, "#playground-left")[0]).first_selected_option.get_attribute("value") == job_ids[1]
            and Select(css(d, "#playground-right")[0]).first_selected_option.get_attribute("value") == job_ids[0]
        ),
        what="the linked models",
    )


def check_evaluation(driver: Any, api: httpx.Client, job_id: str, held_out: str) -> None:
    spec = {"model": "dama/tiny-llava", "adapter_job_id": job_id, "preference_dataset_id": held_out}
    created = api.post("/evaluations", json=spec)
    assert created.status_code == 201, created.text
    driver.get(driver.current_url.split("#")[0] + "#/evaluations")
    wait(driver, lambda d: css(d, "#evaluations-table a"), what="evaluations list")[0].click()
    rows = wait(driver, lambda d: css(d, "#evaluation-outputs tbody tr"), timeout=240, what="per-pair outputs")
    assert len(rows) == 8  # every held-out pair, with its bucket and margins
    metrics = css(driver, "#evaluation-metrics")[0].text
    assert "overall" in metrics and "implicit-reward accuracy" in metrics
    rows = [row.text.split(" ", 1)[0] for row in css(driver, "#evaluation-metrics tbody tr")]
    assert rows == ["overall", "easy", "medium", "hard"], rows  # in order of hardness, as stored results are not
    wait(
        driver,
        lambda d: d.execute_script(
            "const i = document.querySelector('img.chart-png');return i && i.complete && i.naturalWidth > 0"
        ),
        what="chart",
    )
    screenshot(driver, "evaluation")


def check_pair_generation(driver: Any, api: httpx.Client, prompts: Path) -> None:
    uploaded = api.post(
        "/datasets", files={"file": ("prompts.zip", prompts.read_bytes())}, data={"format": "generative"}
    )
    assert uploaded.status_code == 201, uploaded.text
    spec = {"model": "dama/tiny-llava", "generative_dataset_id": uploaded.json()["id"]}
    created = api.post("/pair-generations", json=spec | {"samples_per_prompt": 6, "max_new_tokens": 24})
    assert created.status_code == 201, created.text
    driver.get(driver.current_url.split("#")[0] + "#/pair-generations")
    wait(driver, lambda d: css(d, "#pair-generations-table a"), what="pair generations list")[0].click()
    report = wait(driver, lambda d: css(d, "#pair-report"), timeout=240, what="the pair generation's report")[0]
    run = api.get(f"/pair-generations/{created.json()['id']}").json()
    assert run["status"] == "succeeded" and run["report"]["pairs"] > 0, run
    assert re.search(rf"pairs made\s+{run['report']['pairs']}\b", report.text), report.text
    link = css(driver, "#pairs-dataset a")[0]
    assert link.get_attribute("href").endswith(f"#/datasets/{run['dataset_id']}")
    roles = {row.text.rsplit(" ", 1)[-1] for row in css(driver, "#pair-samples tbody tr")}
    assert {"chosen", "rejected"} <= roles
    wait(
        driver,
        lambda d: d.execute_script(
            "const i = document.querySelector('img.chart-png');return i && i.complete && i.naturalWidth > 0"
        ),
        what="report chart",
    )
    screenshot(driver, "pair-generation")


def check_loop(driver: Any, api: httpx.Client, prompts: Path) -> None:
    """A 2-round loop on the random tiny model: its page shows both rounds' runs and figures, and the chart."""
    sets = []
    for name in ("sampled.zip", "held-out.zip"):
        uploaded = api.post("/datasets", files={"file": (name, prompts.read_bytes())}, data={"format": "generative"})
        assert uploaded.status_code == 201, uploaded.text
        sets.append(uploaded.json()["id"])
    spec = {
        "model": "dama/tiny-llava",
        "generative_dataset_id": sets[0],
        "held_out_dataset_id": sets[1],
        "rounds": 2,
        "sampling": {"samples_per_prompt": 6, "max_new_tokens": 24, "seed": 3, "prompts_per_batch": 3},
        "training": {"method": "dama", "hyperparameters": {"max_steps": 2, "batch_size": 3}},
        "evaluation": {"max_samples": 4, "generation": {"max_new_tokens": 12}},
    }
    created = api.post("/loops", json=spec)
    assert created.status_code == 201, created.text
    driver.get(driver.current_url.split("#")[0] + "#/loops")
    wait(driver, lambda d: css(d, "#loops-table a"), what="loops list")[0].click()
    wait(driver, lambda d: css(d, "h1 .badge")[0].text == "succeeded", timeout=240, what="the loop to succeed")
    loop = api.get(f"/loops/{created.json()['id']}").json()
    rows = [
        [cell.text for cell in row.find_elements("css selector", "td")] for row in css(driver, "#loop-rounds tbody tr")
    ]
    assert len(rows) == 3 and rows[0][0] == "base", rows  # the base, then each round
    for entry, cells in zip(loop["rounds"], rows[1:], strict=True):
        assert entry["job"]["id"] in cells[4] and entry["evaluation"]["id"] in cells[5], cells
        assert abs(float(cells[6]) - entry["metrics"]["chair_i"]) < 1e-3, cells  # the CHAIR_i column
    links = [link.get_attribute("href") for link in css(driver, "#loop-rounds a")]
    assert any(link.endswith(f"#/jobs/{loop['rounds'][1]['job']['id']}") for link in links), links
    assert chart_points(driver, "#loop-chart") == [9]  # CHAIR_i, coverage and POPE F1 at the base and 2 rounds
    # No screenshot: the random model's figures are zeros; docs/images/console-loop.png shows the demo's loop.


def cancel_from_the_page(driver: Any, api: httpx.Client, dataset_id: str) -> None:
    spec = {"model": "dama/tiny-llava", "dataset_id": dataset_id, "hyperparameters": {**HYPERPARAMETERS, "epochs": 50}}
    job_id = api.post("/jobs", json=spec).json()["id"]
    driver.get(driver.current_url.split("#")[0] + f"#/jobs/{job_id}")
    wait(driver, lambda d: css(d, "#job-header .badge")[0].text == "running", timeout=120, what="a running job")
    css(driver, "#cancel-job")[0].click()
    wait(driver, lambda d: css(d, "#job-header .badge")[0].text == "cancelled", timeout=120, what="cancelled")
    assert not css(driver, "#cancel-job") and not css(driver, "#download-adapter")


def open_docs(driver: Any, service: Service) -> None:
    driver.get(f"{service.url}/docs")
    wait(driver, lambda d: len(css(d, ".opblock")) >= 20, timeout=60, what="Swagger UI operations")
    paths = {element.text for element in css(driver, ".opblock-summary-path")}
    assert {"/jobs", "/datasets/{dataset_id}/rows"} <= paths
    screenshot(driver, "docs")
    driver.get(f"{service.url}/redoc")
    wait(driver, lambda d: "Upload a dataset" in d.find_element("tag name", "body").text, timeout=60, what="ReDoc")


def test_console_in_a_browser(service: Service, files: dict[str, Path], browser: tuple[Any, NetworkLog, Path]) -> None:
    driver, network, downloads = browser
    api = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.key}"}, timeout=60)
    sign_in(driver, service)

    upload(driver, files["broken"])  # rejected: the report names the row and the field
    report = wait(driver, lambda d: css(d, "#upload-result table.report tbody tr"), what="upload report")
    assert re.search(r"\b2\b.*rejected", report[0].text), report[0].text
    upload(driver, files["train"], name=XSS_NAME)
    link = wait(driver, lambda d: css(d, "#upload-result a"), timeout=60, what="upload")[0]
    dataset_id = link.get_attribute("href").rsplit("/", 1)[1]
    assert css(driver, "#upload-progress")[0].get_attribute("value") == "1"  # the progress bar followed the upload
    screenshot(driver, "datasets")
    check_dataset_page(driver, dataset_id)

    held_out = api.post("/datasets", files={"file": ("eval.zip", files["eval"].read_bytes())}).json()["id"]
    job_id = create_job(driver, dataset_id, held_out)
    spec = {"model": "dama/tiny-llava", "dataset_id": dataset_id, "method": "dpo"}
    spec |= {"hyperparameters": HYPERPARAMETERS, "evaluation": {"dataset_id": held_out}}
    dpo = api.post("/jobs", json=spec)
    assert dpo.status_code == 201, dpo.text
    watch_job(driver)
    download_adapter(driver, downloads)
    deadline = time.monotonic() + 240
    while api.get(f"/jobs/{dpo.json()['id']}").json()["status"] not in ENDED:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    compare(driver, [job_id, dpo.json()["id"]])
    check_playground(driver, service, api, [job_id, dpo.json()["id"]], files["scenes"])
    check_evaluation(driver, api, job_id, held_out)
    check_pair_generation(driver, api, files["prompts"])
    check_loop(driver, api, files["prompts"])
    cancel_from_the_page(driver, api, dataset_id)
    open_docs(driver, service)

    network.collect()
    assert network.sent_off_host(LOCAL_HOSTS) == []
    assert len(network.urls) > 30
    assert not [url for url in network.urls if service.key in url]
    assert service.key not in service.api_log.read_text(errors="replace")
    assert "GET /jobs" in service.api_log.read_text(errors="replace")  # the access log is on: the check means something
    # live progress came as a fetch stream with the header, not an EventSource with the key in the URL
    streams = [r for r in network.requests.values() if "/events" in r["url"]]
    assert streams and all(r["headers"].get("Accept") == "text/event-stream" for r in streams)
    assert all(r["headers"].get("Authorization") == f"Bearer {service.key}" for r in streams)
    chats = [r for r in network.requests.values() if r["url"].endswith("/v1/chat/completions")]
    assert len(chats) == 2 and all(r["headers"].get("Authorization") == f"Bearer {service.key}" for r in chats)
    assert not [entry for entry in network.console if "Uncaught" in entry["message"]]  # no script error on any page
    assert driver.execute_script("return localStorage.length") == 0  # the key is kept for the tab only
    driver.get(f"{service.url}/console/#/jobs")
    wait(driver, lambda d: css(d, "#sign-out")[0].is_displayed(), what="signed in")
    css(driver, "#sign-out")[0].click()
    wait(driver, lambda d: css(d, "#api-key"), what="the sign-in form")
    assert driver.execute_script("return sessionStorage.length") == 0
    assert not [
        entry
        for entry in network.console
        if "Content Security Policy" in entry["message"] and "/console" in entry["message"]
    ]
