"""The console's server side over HTTP: the dataset preview routes (rows, images, hardness; tenant-scoped), the
offline docs and console pages with their Content-Security-Policy, and the OpenAPI entries of the new routes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from dama_engine.proving.shapes import make_demo_dataset
from tests.api.conftest import ApiServer, assert_error, upload, zip_bytes

PNG = b"\x89PNG\r\n\x1a\n"


def test_rows_sample_with_both_answers_and_image_urls(client1: httpx.Client, dataset1: dict[str, Any]) -> None:
    page = client1.get(f"/datasets/{dataset1['id']}/rows", params={"limit": 4}).json()
    assert page["format"] == "trl" and page["total_rows"] == 6 and page["sampled_rows"] == 6 and page["has_more"]
    first = page["data"][0]
    assert first["row"] == 1 and first["prompt"] and first["chosen"] and first["rejected"]
    assert first["images"] == [f"/datasets/{dataset1['id']}/rows/1/images/0"]
    rest = client1.get(f"/datasets/{dataset1['id']}/rows", params={"offset": 4, "limit": 4}).json()
    assert [row["row"] for row in rest["data"]] == [5, 6] and not rest["has_more"]
    assert_error(client1.get(f"/datasets/{dataset1['id']}/rows", params={"limit": 0}), 422)


def test_row_image_is_a_png_with_nosniff(client1: httpx.Client, dataset1: dict[str, Any]) -> None:
    response = client1.get(f"/datasets/{dataset1['id']}/rows/1/images/0")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content.startswith(PNG)
    assert Image.open(io.BytesIO(response.content)).size[0] > 0
    assert_error(client1.get(f"/datasets/{dataset1['id']}/rows/1/images/1"), 404, "image_not_found")
    assert_error(client1.get(f"/datasets/{dataset1['id']}/rows/999/images/0"), 404, "image_not_found")


def test_preview_is_tenant_scoped(client2: httpx.Client, dataset1: dict[str, Any], api_server: ApiServer) -> None:
    for path in ("rows", "rows/1/images/0", "hardness"):
        assert_error(client2.get(f"/datasets/{dataset1['id']}/{path}"), 404, "dataset_not_found")
        assert api_server.client().get(f"/datasets/{dataset1['id']}/{path}").status_code == 401


def test_hardness_histogram_from_row_scores(client1: httpx.Client) -> None:
    rows = []
    for index, value in enumerate([0.1, 0.2, 0.2, 0.9]):
        image = io.BytesIO()
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(image, format="PNG")
        rows.append(
            {
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
                "chosen": "a red square",
                "rejected": "a blue circle",
                "images": [f"images/{index}.png"],
                "hardness": value,
            }
        )
        rows[-1]["_image"] = image.getvalue()
    members = {f"images/{i}.png": row.pop("_image") for i, row in enumerate(rows)}
    members["data.jsonl"] = "\n".join(json.dumps(row) for row in rows).encode()
    created = upload(client1, zip_bytes(members), "scored.zip")
    assert created.status_code == 201, created.text
    histogram = client1.get(f"/datasets/{created.json()['id']}/hardness", params={"bins": 4}).json()
    assert histogram["source"] == "rows" and histogram["count"] == 4
    assert histogram["min"] == 0.1 and histogram["max"] == 0.9
    assert [item["count"] for item in histogram["bins"]] == [3, 0, 0, 1]
    assert_error(client1.get(f"/datasets/{created.json()['id']}/hardness", params={"bins": 0}), 422)


def test_no_histogram_without_scores(client1: httpx.Client, dataset1: dict[str, Any]) -> None:
    histogram = client1.get(f"/datasets/{dataset1['id']}/hardness").json()
    assert histogram == {
        "dataset_id": dataset1["id"],
        "source": None,
        "count": 0,
        "min": None,
        "max": None,
        "mean": None,
        "bins": [],
    }


def test_console_and_docs_pages_are_offline_with_a_csp(api_server: ApiServer) -> None:
    with api_server.client() as client:
        assert client.get("/").headers["location"] == "/console/"
        console = client.get("/console/")
        csp = console.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert '<script type="module" src="/console/static/main.js">' in console.text
        assert client.get("/console/static/main.js").headers["content-security-policy"] == csp
        for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            response = client.get(page)
            policy = response.headers["content-security-policy"]
            assert "script-src 'self';" in policy and "unsafe-eval" not in policy
            assert "http" not in response.text.replace("http-equiv", "")  # no absolute URL: nothing remote
            assert "<script>" not in response.text  # no inline script
            served = client.get(f"/docs-static/vendor/{asset}")
            assert served.status_code == 200 and len(served.content) > 100_000


def test_openapi_documents_the_preview_routes(api_server: ApiServer) -> None:
    paths = httpx.get(f"{api_server.url}/openapi.json").json()["paths"]
    assert {"/datasets/{dataset_id}/rows", "/datasets/{dataset_id}/rows/{row}/images/{index}"} <= set(paths)
    image = paths["/datasets/{dataset_id}/rows/{row}/images/{index}"]["get"]
    assert "image/png" in image["responses"]["200"]["content"]
    assert paths["/datasets/{dataset_id}/hardness"]["get"]["responses"]["200"]["content"]["application/json"]
    assert not any(path.startswith(("/console", "/docs")) for path in paths)


def test_a_generative_set_previews_its_objects(client1: httpx.Client, tmp_path: Path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=1, n_eval=0, n_generative=3, image_size=32)
    members = {
        "generative_eval.jsonl": demo.generative_eval.read_bytes(),
        "vocabulary.json": (tmp_path / "vocabulary.json").read_bytes(),
    }
    members |= {f"images/{image.name}": image.read_bytes() for image in demo.images_dir.glob("gen_*")}
    created = upload(client1, zip_bytes(members), "generative.zip")
    assert created.status_code == 201 and created.json()["format"] == "generative", created.text
    rows = client1.get(f"/datasets/{created.json()['id']}/rows").json()
    assert rows["format"] == "generative" and rows["total_rows"] == 3 and len(rows["data"]) == 3
    first = rows["data"][0]
    assert first["objects"] and first["prompt"] and first["chosen"] is None
    assert client1.get(first["images"][0]).content.startswith(PNG)
    assert client1.get(f"/datasets/{created.json()['id']}/hardness").json()["source"] is None
