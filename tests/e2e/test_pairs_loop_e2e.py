"""The loop this service exists for, through the HTTP API alone, on the real service (the compose commands' API
and Celery worker, Postgres, Redis): shapes-world scenes uploaded as an ordinary generative set (image, prompt,
objects, vocabulary), pairs sampled from the proving ground's seeing base (``dama/tiny-seeing-llava``) by
``POST /pair-generations``, their chosen answers faithful and rejected ones hallucinating by this test's own run of
the matcher, then a DAMA job on the pair dataset (hardness from the pairs' scores) that lowers CHAIR_i on the
proving ground's held-out scenes. No proving-ground code on the service's path: the scenes are files to it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dama_engine.data import judge_response
from dama_engine.data.matcher import Vocabulary
from dama_engine.proving.ground import IMAGE_SIZE, PAIRS, ProvingGround
from dama_engine.proving.shapes import make_demo_dataset
from jobstore.settings import Settings
from tests.e2e.test_service_e2e import ENDED, run_service
from tests.e2e.test_service_e2e import _free_port as free_port
from worker.engine_config import model_cache_root, seeing_base_dir
from worker.serve import _archive, demo_spec

pytestmark = pytest.mark.slow

SCENES_FOR_PAIRS = PAIRS["scenes"]  # the proving ground's own count (1,600 scenes, 8 samples each)
HELD_OUT_SCENES = 200


@pytest.fixture(scope="module")
def service(
    pg_url: str, redis_url: str, proving_ground: ProvingGround, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pairs-loop")
    # The worker's build of the seeing base (same recipe, identical weights on this machine) would add a minute:
    # its model cache gets the session's copy.
    cache = model_cache_root(Settings(home=root, model_cache_dir=root / "models"))
    shutil.copytree(proving_ground.base, seeing_base_dir(cache))
    # The judge of prompt sets: the service's own inference server, on loopback (allowed by the operator), serving
    # the seeing base, asked with the scenes' own prompt; its key is the inference secret in the workers' env.
    infer_port = free_port()
    judge = {
        "url": f"http://127.0.0.1:{infer_port}/v1",
        "model": "dama/tiny-seeing-llava",
        "api_key_env": "DAMA_INFERENCE_SECRET",
        "prompt": "Describe the image.",
    }
    yield from run_service(
        root,
        pg_url,
        redis_url,
        infer_port=infer_port,
        DAMA_JUDGE_TARGETS=json.dumps({"seeing": judge}),
        DAMA_JUDGE_ALLOWED_HOSTS="127.0.0.1",
    )


def _upload(client: httpx.Client, archive: Path, data_format: str) -> str:
    with archive.open("rb") as handle:
        response = client.post("/datasets", files={"file": (archive.name, handle)}, data={"format": data_format})
    assert response.status_code == 201, response.text
    dataset_id: str = response.json()["id"]
    return dataset_id


def _ended(client: httpx.Client, path: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (run := client.get(path).json())["status"] not in ENDED:
        assert time.monotonic() < deadline, run
        time.sleep(1.0)
    return run


def test_pairs_sampled_from_the_model_train_a_dama_job_that_lowers_chair_i(
    service: dict[str, Any], proving_ground: ProvingGround, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {service['key']}"}
    with httpx.Client(base_url=service["url"], headers=headers, timeout=120) as client:
        # Scenes the base has never seen (their own seed), and the proving ground's held-out scenes, as files.
        fresh = make_demo_dataset(
            tmp_path / "scenes", n_train=0, n_eval=0, n_generative=SCENES_FOR_PAIRS, image_size=IMAGE_SIZE, seed=23
        )
        scenes = _upload(
            client, _archive(tmp_path / "scenes.zip", fresh.generative_eval, fresh.vocabulary), "generative"
        )
        held_out = _upload(
            client,
            _archive(tmp_path / "held-out.zip", proving_ground.generative, proving_ground.vocabulary),
            "generative",
        )

        sampling = {
            "samples_per_prompt": PAIRS["samples"],
            "temperature": PAIRS["temperature"],
            "max_new_tokens": 40,
            "seed": 0,
            "prompts_per_batch": 16,
        }
        created = client.post(
            "/pair-generations",
            json={"model": "dama/tiny-seeing-llava", "generative_dataset_id": scenes, **sampling},
        )
        assert created.status_code == 201, created.text
        run = _ended(client, f"/pair-generations/{created.json()['id']}")
        assert run["status"] == "succeeded", run
        report = run["report"]
        assert report["prompts_tried"] == SCENES_FOR_PAIRS and report["pairs"] >= 300, report

        # Every pair checked with this test's own run of the matcher: chosen faithful, rejected hallucinating.
        samples = [
            json.loads(line)
            for line in client.get(
                f"/pair-generations/{run['id']}/outputs", params={"file": "samples"}
            ).text.splitlines()
            if line.strip()
        ]
        vocabulary = Vocabulary.load(fresh.vocabulary)
        roles = [sample for sample in samples if sample["role"]]
        assert len(roles) == 2 * report["pairs"]
        for sample in roles:
            judged = judge_response(sample["response"], sample["objects"], vocabulary)
            if sample["role"] == "chosen":
                assert not judged.hallucinated, sample
            else:
                assert judged.hallucinated, sample

        # A DAMA job on those pairs, with the proving ground's preference settings (hardness from the pairs'
        # scores), evaluated on the held-out scenes by the base and the tuned model.
        spec = demo_spec(
            {"train": run["dataset_id"], "eval": "", "scenes": held_out}, steps=None, scenes=HELD_OUT_SCENES
        )
        spec["evaluation"] = {
            "holdout_fraction": 0.1,
            "generative_dataset_id": held_out,
            "max_samples": HELD_OUT_SCENES,
            "max_new_tokens": spec["evaluation"]["max_new_tokens"],
        }
        job = client.post("/jobs", json=spec)
        assert job.status_code == 201, job.text
        trained = _ended(client, f"/jobs/{job.json()['id']}")
        assert trained["status"] == "succeeded", trained
        generative = trained["result"]["evaluation"]["generative"]
        base, tuned = generative["base"]["chair_i"], generative["tuned"]["chair_i"]
        print(
            f"pairs {report['pairs']} of {SCENES_FOR_PAIRS} scenes; CHAIR_i on {HELD_OUT_SCENES} held-out scenes "
            f"{base:.3f} -> {tuned:.3f}"
        )
        assert tuned < base, generative


JUDGED_SCENES = 48


def test_a_prompt_set_is_paired_against_the_objects_a_judge_on_loopback_lists(
    service: dict[str, Any], tmp_path: Path
) -> None:
    """Scenes uploaded without their objects (a prompt set); the judge (the service's own inference server serving
    the seeing base) describes each image, its words matched onto the vocabulary; the samples judged against that."""
    headers = {"Authorization": f"Bearer {service['key']}"}
    with httpx.Client(base_url=service["url"], headers=headers, timeout=120) as client:
        scenes = make_demo_dataset(
            tmp_path / "scenes", n_train=0, n_eval=0, n_generative=JUDGED_SCENES, image_size=IMAGE_SIZE, seed=29
        )
        rows = [json.loads(line) for line in scenes.generative_eval.read_text().splitlines()]
        truth = {str(row["id"]): row["objects"] for row in rows}
        scenes.generative_eval.write_text(
            "".join(json.dumps({k: v for k, v in row.items() if k != "objects"}) + "\n" for row in rows)
        )
        unlabelled = _upload(
            client, _archive(tmp_path / "prompts.zip", scenes.generative_eval, scenes.vocabulary), "auto"
        )
        assert client.get(f"/datasets/{unlabelled}").json()["format"] == "prompts"
        body = {
            "model": "dama/tiny-seeing-llava",
            "generative_dataset_id": unlabelled,
            "judge": "seeing",
            "samples_per_prompt": PAIRS["samples"],
            "temperature": PAIRS["temperature"],
            "max_new_tokens": 40,
            "prompts_per_batch": 16,
        }
        created = client.post("/pair-generations", json=body)
        assert created.status_code == 201, created.text
        run = _ended(client, f"/pair-generations/{created.json()['id']}")
        assert run["status"] == "succeeded", run
        judge = run["report"]["judge"]
        assert (judge["name"], judge["images"], judge["failed_images"]) == ("seeing", JUDGED_SCENES, 0), judge
        assert run["report"]["pairs"] > 0

        # The judge's objects per scene against the scenes' true objects (which the service never saw).
        samples = [
            json.loads(line)
            for line in client.get(
                f"/pair-generations/{run['id']}/outputs", params={"file": "samples"}
            ).text.splitlines()
            if line.strip()
        ]
        listed = {sample["prompt_id"]: sample["objects"] for sample in samples}
        assert set(listed) == set(truth)
        found = sum(len(set(listed[key]) & set(truth[key])) for key in truth)
        recall = found / sum(len(objects) for objects in truth.values())
        precision = found / max(1, sum(len(objects) for objects in listed.values()))
        print(f"judge on {JUDGED_SCENES} scenes: recall {recall:.2f}, precision {precision:.2f}; {judge}")
        assert recall >= 0.5 and precision >= 0.5, (recall, precision)
        vocabulary = Vocabulary.load(scenes.vocabulary)
        for sample in samples:
            if sample["role"]:
                judged = judge_response(sample["response"], listed[sample["prompt_id"]], vocabulary)
                assert bool(judged.hallucinated) == (sample["role"] == "rejected"), sample
