"""The OpenAPI document, part of the product: every field described, errors in the one shape the API answers.

FastAPI's document is adjusted in five ways: its 422 ``HTTPValidationError`` is replaced by our
:class:`~api.schemas.ErrorResponse` (that is what the handler answers); the errors any route may answer besides its
own (400 from :mod:`api.errors` and :mod:`api.guards`, 413 for JSON bodies, 401 and 429 for authenticated routes)
are listed on every operation they apply to; the multipart form of ``POST /datasets`` (parsed by hand, to stream
it) is added as ``DatasetUpload``; job-spec fields that ``jobstore.spec`` leaves undescribed get a
description here (a field described there wins); and every create links to the operations on what it created
(:data:`LINKS`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.responses import UNAUTHORIZED
from api.schemas import DatasetUpload, ErrorResponse

TITLE = "DAMA alignment service"
DESCRIPTION = """
Fine-tune multimodal LLMs on your preference data with **DAMA** (Data- and Model-aware DPO) and download a LoRA
adapter that loads with `peft` on top of the base model.

1. `POST /datasets` a preference dataset (TRL, RLAIF-V or OpenAI preference format; an archive with images).
2. `POST /jobs` a job spec naming the base model, the dataset, the method and hyper-parameters (`POST /jobs/estimate`
   with the same body first says what it would take: steps, tokens, memory per GPU, time, whether it fits).
3. Follow `GET /jobs/{id}` (status, stage, step, percent, ETA), `GET /jobs/{id}/events` (also live as
   `text/event-stream`) and `GET /jobs/{id}/metrics`.
4. `GET /jobs/{id}/adapter` once the job succeeded.
5. `POST /evaluations` to score a base model, or a job's adapter against its base, on held-out preference pairs
   and a generative set (object hallucination: CHAIR); `GET /evaluations/{id}` carries the `metrics`,
   `/outputs` the per-sample generations and `/chart` the PNG.
6. `POST /pair-generations` to make preference pairs from your own model (or a job's adapter) on a generative set:
   answers are sampled, judged against each image's objects, and paired into a dataset for `POST /jobs`.
7. `POST /loops` to run rounds of that on the server: each round samples pairs from the previous round's tuned
   model, trains it further on them and evaluates it on held-out scenes; `GET /loops/{id}` has each round's runs
   and metrics.

**Auth**: `Authorization: Bearer <API key>` (create one with `dama admin create-key --tenant NAME`).
**Errors**: always `{"error": {"type", "code", "message", "param"}}`; `param` is the field at fault as a dotted path.
**Lists**: `?limit=&after=` cursor pagination answering `{"data", "has_more", "next_cursor"}`.
**Types**: JSON bodies are taken as the schemas type them, never coerced: a boolean is `true` or `false` (not
`"true"` or `1`), an integer is a JSON integer (`2`, not `"2"` or `2.0`), a number is not a string; an integer is
accepted where a number is asked for.
**Webhooks**: `POST /webhooks` a URL to be told when jobs and evaluations start and end (signed per Standard
Webhooks; verify with the `standardwebhooks` library and the `whsec_` secret the call returns once).
**Retries**: send an `Idempotency-Key` header with `POST /datasets`, `POST /jobs`, `POST /evaluations`,
`POST /pair-generations` and `POST /loops`.
""".strip()

TAGS: list[dict[str, Any]] = [
    {"name": "datasets", "description": "Upload, inspect and delete preference datasets (validated on upload)."},
    {
        "name": "jobs",
        "description": "Create, list, inspect and cancel fine-tuning jobs; estimate one before launching it (rows, "
        "steps, tokens, memory per GPU, time, whether it fits).",
    },
    {
        "name": "job outputs",
        "description": "Events (paged or live), metric series, checkpoints (each downloadable as an adapter) and "
        "the adapter.",
    },
    {
        "name": "exports",
        "description": "Merged exports: the adapter folded into its base model on a worker, downloadable with "
        "its sha256 and byte ranges.",
    },
    {
        "name": "evaluations",
        "description": "Score a base model and a tuned adapter: preference metrics per hardness bucket, CHAIR.",
    },
    {
        "name": "pair generations",
        "description": "Preference pairs sampled from your model on a generative set, judged against each image's "
        "objects (CHAIR matcher), registered as a dataset; the per-sample file and a report.",
    },
    {
        "name": "loops",
        "description": "Rounds on the server: sample pairs from the model, train on them, evaluate on held-out "
        "scenes, then sample again from the tuned model; per-round metrics, events and webhooks (loop.*).",
    },
    {
        "name": "webhooks",
        "description": "Signed (Standard Webhooks) notifications of job and evaluation status changes, retried for "
        "hours; endpoints, their delivery log and redelivery.",
    },
    {"name": "keys", "description": "The tenant's API keys: create (the secret shown once), list, revoke."},
    {"name": "models", "description": "Supported model families and built-in tiny models."},
    {"name": "health", "description": "Liveness and readiness probes (no auth)."},
]

# Descriptions (and examples) of job-spec fields that jobstore.spec leaves bare.
SPEC_FIELD_DOCS: dict[tuple[str, str], tuple[str, Any]] = {
    ("Hyperparameters", "beta"): ("Base DPO temperature.", 0.1),
    ("Hyperparameters", "epochs"): ("Passes over the training data (unless max_steps is set).", 1),
    ("Hyperparameters", "grad_accumulation"): ("Micro-batches accumulated per optimizer step.", 4),
    ("Hyperparameters", "warmup_ratio"): ("Share of the steps spent warming the learning rate up.", 0.1),
    ("Hyperparameters", "weight_decay"): ("AdamW weight decay.", 0.0),
    ("Hyperparameters", "gradient_checkpointing"): ("Recompute activations to save GPU memory.", False),
    ("Hyperparameters", "seed"): ("Random seed (data order, LoRA init, dropout).", 0),
    ("LoraSpec", "r"): ("LoRA rank.", 16),
    ("LoraSpec", "alpha"): ("LoRA scaling numerator (scale = alpha / r).", 32),
    ("LoraSpec", "dropout"): ("Dropout on the LoRA branch.", 0.05),
    ("JobSpec", "hyperparameters"): ("Optimisation and DAMA settings.", None),
    ("JobSpec", "lora"): ("LoRA adapter settings.", None),
}


class Link(NamedTuple):
    """An OpenAPI link: from a create's response to an operation on what it created."""

    method: str
    path: str
    description: str
    parameters: dict[str, Any]
    body: dict[str, Any] | None = None  # merged into the target's request body


_ID = "$response.body#/id"
_JOB = {"job_id": _ID}
_EVALUATION = {"evaluation_id": _ID}
_DATASET = {"dataset_id": _ID}
_WEBHOOK = {"webhook_id": _ID}
_EXPORT = {"job_id": "$request.path.job_id", "export_id": _ID}
_PAIR_GENERATION = {"pair_generation_id": _ID}
_LOOP = {"loop_id": _ID}
_ESTIMATE = {"estimate_id": _ID}

# From every create (each of its 2xx responses: created, or replayed by an Idempotency-Key) to the operations on
# the object it created, so that a client (and a stateful fuzzer) can follow them; Swagger UI lists them.
LINKS: dict[tuple[str, str], dict[str, Link]] = {
    ("post", "/datasets"): {
        "GetDataset": Link("get", "/datasets/{dataset_id}", "The dataset.", _DATASET),
        "SampleRows": Link("get", "/datasets/{dataset_id}/rows", "Its sample rows.", _DATASET),
        "RowImage": Link(
            "get",
            "/datasets/{dataset_id}/rows/{row}/images/{index}",
            "The first image of its first row.",
            {**_DATASET, "row": 1, "index": 0},
        ),
        "Hardness": Link("get", "/datasets/{dataset_id}/hardness", "Its hardness histogram.", _DATASET),
        "DeleteDataset": Link("delete", "/datasets/{dataset_id}", "Delete it.", _DATASET),
        "TrainOnIt": Link("post", "/jobs", "A job trained on it.", {}, {"dataset_id": _ID}),
        "EstimateTrainingOnIt": Link(
            "post", "/jobs/estimate", "What a job trained on it would take.", {}, {"dataset_id": _ID}
        ),
        "EvaluateOnIt": Link("post", "/evaluations", "An evaluation on it.", {}, {"preference_dataset_id": _ID}),
    },
    ("post", "/jobs"): {
        "GetJob": Link("get", "/jobs/{job_id}", "The job.", _JOB),
        "CancelJob": Link("post", "/jobs/{job_id}/cancel", "Cancel it.", _JOB),
        "JobEvents": Link("get", "/jobs/{job_id}/events", "Its events.", _JOB),
        "JobMetrics": Link("get", "/jobs/{job_id}/metrics", "Its metric series.", _JOB),
        "JobCheckpoints": Link("get", "/jobs/{job_id}/checkpoints", "Its checkpoints.", _JOB),
        "JobAdapter": Link("get", "/jobs/{job_id}/adapter", "Its adapter, once it succeeded.", _JOB),
        "ExportJob": Link("post", "/jobs/{job_id}/exports", "A merged export of its adapter.", _JOB),
        "JobExports": Link("get", "/jobs/{job_id}/exports", "Its exports.", _JOB),
        "EvaluateAdapter": Link(
            "post", "/evaluations", "An evaluation of its adapter against the base.", {}, {"adapter_job_id": _ID}
        ),
    },
    ("post", "/jobs/estimate"): {
        "GetEstimate": Link("get", "/jobs/estimates/{estimate_id}", "The estimate (poll it after a 202).", _ESTIMATE),
    },
    ("post", "/evaluations"): {
        "GetEvaluation": Link("get", "/evaluations/{evaluation_id}", "The evaluation.", _EVALUATION),
        "CancelEvaluation": Link("post", "/evaluations/{evaluation_id}/cancel", "Cancel it.", _EVALUATION),
        "EvaluationEvents": Link("get", "/evaluations/{evaluation_id}/events", "Its events.", _EVALUATION),
        "EvaluationOutputs": Link(
            "get", "/evaluations/{evaluation_id}/outputs", "Its per-sample generations.", _EVALUATION
        ),
        "EvaluationChart": Link("get", "/evaluations/{evaluation_id}/chart", "Its chart.", _EVALUATION),
    },
    ("post", "/pair-generations"): {
        "GetPairGeneration": Link("get", "/pair-generations/{pair_generation_id}", "The run.", _PAIR_GENERATION),
        "CancelPairGeneration": Link(
            "post", "/pair-generations/{pair_generation_id}/cancel", "Cancel it.", _PAIR_GENERATION
        ),
        "PairGenerationEvents": Link(
            "get", "/pair-generations/{pair_generation_id}/events", "Its events.", _PAIR_GENERATION
        ),
        "PairGenerationOutputs": Link(
            "get", "/pair-generations/{pair_generation_id}/outputs", "Its per-sample file.", _PAIR_GENERATION
        ),
    },
    ("post", "/loops"): {
        "GetLoop": Link("get", "/loops/{loop_id}", "The loop, its rounds' runs and metrics.", _LOOP),
        "CancelLoop": Link("post", "/loops/{loop_id}/cancel", "Cancel it (and its current run).", _LOOP),
        "LoopEvents": Link("get", "/loops/{loop_id}/events", "Its events.", _LOOP),
    },
    ("post", "/jobs/{job_id}/exports"): {
        "GetExport": Link("get", "/jobs/{job_id}/exports/{export_id}", "The export.", _EXPORT),
        "DownloadExport": Link(
            "get", "/jobs/{job_id}/exports/{export_id}/download", "Its archive, once it succeeded.", _EXPORT
        ),
        "JobExports": Link("get", "/jobs/{job_id}/exports", "The job's exports.", {"job_id": "$request.path.job_id"}),
    },
    ("post", "/webhooks"): {
        "GetWebhook": Link("get", "/webhooks/{webhook_id}", "The endpoint.", _WEBHOOK),
        "UpdateWebhook": Link("patch", "/webhooks/{webhook_id}", "Change or disable it.", _WEBHOOK),
        "WebhookDeliveries": Link("get", "/webhooks/{webhook_id}/deliveries", "Its delivery log.", _WEBHOOK),
        "DeleteWebhook": Link("delete", "/webhooks/{webhook_id}", "Delete it.", _WEBHOOK),
    },
    ("post", "/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): {
        "WebhookDeliveries": Link(
            "get",
            "/webhooks/{webhook_id}/deliveries",
            "The endpoint's delivery log, where the attempt shows.",
            {"webhook_id": "$request.path.webhook_id"},
        ),
    },
    # Not a create, but the only way to a delivery's id: the newest one of the log.
    ("get", "/webhooks/{webhook_id}/deliveries"): {
        "RedeliverNewest": Link(
            "post",
            "/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver",
            "Send the newest delivery of the page again.",
            {"webhook_id": "$request.path.webhook_id", "delivery_id": "$response.body#/data/0/id"},
        ),
    },
    ("post", "/keys"): {
        "RevokeKey": Link("delete", "/keys/{key_id}", "Revoke it.", {"key_id": _ID}),
    },
}


_REMOTE_CODE = (
    "trust_remote_code true only where the operator allows it (DAMA_ALLOW_REMOTE_CODE; else 422 "
    "remote_code_not_allowed)"
)
_URL_RULE = (
    "url: http:// or https://, naming a host, without credentials; localhost and literal private, loopback, "
    "link-local or reserved addresses are refused unless DAMA_WEBHOOK_ALLOWED_HOSTS names the host (400 "
    "url_not_allowed); a name is checked when a delivery resolves it"
)
# What POST /jobs (and POST /jobs/estimate, which checks the same) must follow besides its schema.
_JOB_RULES = [
    "with a filtering method (beta_dpo, dama_model, dama), floor(hyperparameters.keep_ratio x group) >= 2, "
    "group being hyperparameters.batch_size x gpus, times hyperparameters.grad_accumulation when "
    "hyperparameters.filter_scope is step (else 400 filter_group_too_small)",
    "with a method that weighs pairs by data hardness (dama, dama_data), the dataset's rows carry hardness "
    "(or chosen_score and rejected_score), or the service has a hardness scorer (GET /models; else 400 "
    "hardness_required)",
    "integrations[].target: a tracking target this service defines (else 400 unknown_tracking_target)",
    _REMOTE_CODE,
    "the datasets are this tenant's (else 404) and of the right kind; init_adapter names a job of this tenant "
    "on the same base model that succeeded, or a kept checkpoint of it (else 404 or 422)",
]
# Rules a request must also follow that its schema cannot state: what a file holds, arithmetic across fields,
# the operator's settings, other objects' state. Added to the operation's description; the fuzzing run leaves
# schemathesis' positive_data_acceptance check out on exactly these operations (tests/api/fuzzing.py).
RULES: dict[tuple[str, str], list[str]] = {
    ("post", "/datasets"): [
        "file: a non-empty data file (.jsonl, .json, .parquet) or a .zip / .tar / .tar.gz archive holding one with "
        "its images (else 400 invalid_dataset, 422 empty_file)",
        "every row in one format (TRL, RLAIF-V, OpenAI preference; generative: image, prompt, objects plus "
        "vocabulary.json) with its images readable (else 422, every problem listed with its row and field)",
        "within the upload limits (else 413, the limit named)",
    ],
    ("post", "/jobs"): [
        *_JOB_RULES,
        "with DAMA_WORKER_GPU_MEMORY_GB set, the job fits one worker GPU by its estimate (else 400 does_not_fit, "
        "saying what to change)",
    ],
    ("post", "/jobs/estimate"): [
        *_JOB_RULES,
        "the model loads and the rows can be read and measured on a worker (else 400 estimate_failed)",
        "at most DAMA_MAX_PENDING_ESTIMATES estimates of this tenant queued or running (else 429 "
        "too_many_pending_estimates)",
    ],
    ("post", "/evaluations"): [
        _REMOTE_CODE,
        "the datasets are this tenant's (else 404) and of the right kind (else 422); adapter_job_id is a training "
        "job of this tenant that succeeded (else 404 or 409), trained on model (else 422)",
    ],
    ("post", "/pair-generations"): [
        "model: a dama/... name is one of the built-in models (GET /models; else 400 unknown_model)",
        "samples_per_prompt and max_prompts within the operator's limits (DAMA_PAIRS_MAX_SAMPLES_PER_PROMPT, "
        "DAMA_PAIRS_MAX_PROMPTS; else 422 samples_over_limit or prompts_over_limit), and without max_prompts the "
        "set has no more prompts than that (else 400 prompts_over_limit)",
        _REMOTE_CODE,
        "generative_dataset_id is a generative set of this tenant (else 404, or 422 dataset_not_generative); "
        "init_adapter names a job of this tenant on the same base model that succeeded, or a kept checkpoint of it "
        "(else 404 or 422)",
        "judge: a judge this service defines (else 400 unknown_judge), given for a prompt set (else 400 "
        "judge_required) and only for one (else 400 judge_not_needed)",
    ],
    ("post", "/loops"): [
        "rounds at most the operator's DAMA_LOOPS_MAX_ROUNDS (else 422 rounds_over_limit); at most "
        "DAMA_LOOPS_MAX_ACTIVE loops of this tenant running (else 429 too_many_active_loops)",
        "model: a dama/... name is one of the built-in models (GET /models; else 400 unknown_model)",
        "generative_dataset_id and held_out_dataset_id are generative sets of this tenant (else 404, or 422 "
        "dataset_not_generative), and not the same set (else 422 held_out_is_sampled)",
        "sampling within the pair generations' limits (else 422 samples_over_limit or prompts_over_limit, or 400 "
        "prompts_over_limit)",
        "more than one round needs training.lora.enabled (else 422 rounds_need_lora); init_adapter names a job of "
        "this tenant on the same base model that succeeded, or a kept checkpoint of it (else 404 or 422)",
        _REMOTE_CODE,
    ],
    ("post", "/v1/chat/completions"): [
        "model: a base the service offers or a job, checkpoint or merged export of this tenant (GET /v1/models; else "
        "404 model_not_found, 409 model_not_ready)",
        "max_tokens (or max_completion_tokens) at most the operator's DAMA_CHAT_MAX_TOKENS, at most "
        "DAMA_CHAT_MAX_IMAGES images, each a decodable image of at most DAMA_CHAT_MAX_IMAGE_PIXELS pixels, given as a "
        "base64 data URI or an http(s) URL of a host on DAMA_CHAT_IMAGE_HOSTS, images in user messages only (else "
        "400 with the part at fault)",
        "the tenant's chat requests and tokens within DAMA_CHAT_RATE_LIMIT and DAMA_CHAT_TOKEN_LIMIT (else 429; a "
        "request that alone reserves more tokens than the limit: 400 request_over_limit)",
    ],
    ("post", "/playground/judge"): [
        "dataset_id is a generative set of this tenant (else 404, or 400 not_generative) and row one of its preview "
        "rows (GET /datasets/{id}/rows; else 404 row_not_found)",
    ],
    ("post", "/webhooks"): [_URL_RULE],
    ("patch", "/webhooks/{webhook_id}"): [_URL_RULE],
}
RULES_HEADING = "Rules beyond the schema:"

# Path parameters: what each id is.
PATH_PARAMETERS = {
    "dataset_id": "The dataset's id (ds_...).",
    "job_id": "The training job's id (job_...).",
    "evaluation_id": "The evaluation's id (eval_...).",
    "pair_generation_id": "The pair generation's id (pgen_...).",
    "loop_id": "The loop's id (loop_...).",
    "export_id": "The export's id (exp_...).",
    "estimate_id": "The job estimate's id (est_...).",
    "webhook_id": "The webhook endpoint's id (wh_...).",
    "delivery_id": "The delivery's id (whd_...).",
    "key_id": "The API key's id (key_...), not its secret.",
}
# The request guard (api.guards) refuses a NUL character in the path or a query parameter: said in the schema.
NO_NUL = r"^[^\x00]*$"


def _document_rules(paths: dict[str, Any]) -> None:
    for (method, path), rules in RULES.items():
        operation = paths[path][method]
        listed = "\n".join(f"- {rule}." for rule in rules)
        operation["description"] = f"{operation.get('description', '').rstrip()}\n\n{RULES_HEADING}\n{listed}".strip()


def _document_parameters(operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        if parameter["in"] not in ("path", "query"):
            continue
        if parameter["in"] == "path" and parameter["name"] in PATH_PARAMETERS:
            parameter.setdefault("description", PATH_PARAMETERS[parameter["name"]])
        schema = parameter.get("schema", {})
        for option in [schema, *schema.get("anyOf", [])]:
            if option.get("type") == "string" and "pattern" not in option and "enum" not in option:
                option["pattern"] = NO_NUL


def _add_links(paths: dict[str, Any]) -> None:
    for (method, path), links in LINKS.items():
        responses = paths[path][method]["responses"]
        documented = {}
        for name, link in links.items():
            target = paths[link.path][link.method]
            documented[name] = {"operationId": target["operationId"], "description": link.description}
            if link.parameters:
                documented[name]["parameters"] = link.parameters
            if link.body is not None:
                documented[name]["requestBody"] = link.body
        for status, response in responses.items():
            if status.startswith("2"):
                response["links"] = documented


def _describe_spec_fields(schemas: dict[str, Any]) -> None:
    for (schema_name, field_name), (description, example) in SPEC_FIELD_DOCS.items():
        prop = schemas.get(schema_name, {}).get("properties", {}).get(field_name)
        if prop is None:
            continue
        prop.setdefault("description", description)
        if example is not None and "examples" not in prop:
            prop["examples"] = [example]


def _replace_refs(node: Any, old: str, new: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and value == old:
                node[key] = new
            else:
                _replace_refs(value, old, new)
    elif isinstance(node, list):
        for item in node:
            _replace_refs(item, old, new)


def _document_common_errors(operation: dict[str, Any], error_content: dict[str, Any]) -> None:
    """The errors any route may answer besides its own (api.errors, api.guards, api.deps), in the document."""
    responses: dict[str, Any] = operation.setdefault("responses", {})
    response = responses.get("422")
    if response is not None and response.get("description") == "Validation Error":
        response["description"] = "Invalid request; error.param names the field at fault."
    json_body = "application/json" in operation.get("requestBody", {}).get("content", {})
    causes = ["invalid_characters (a NUL character in the path or a query parameter)"]
    if json_body:
        causes.insert(0, "invalid_json (the body is not a JSON document)")
    causes.append("invalid_value (a value the job store cannot hold)")
    _add_response(responses, "400", "; ".join(causes) + ".", error_content)
    if json_body:
        responses.setdefault(
            "413",
            {
                "description": "request_too_large: the body is over DAMA_MAX_JSON_BODY_BYTES.",
                "content": error_content,
            },
        )
    if operation.get("security"):
        responses.setdefault("401", {"description": UNAUTHORIZED["description"], "content": error_content})
    if "401" in responses:  # authenticated routes count against the tenant's rate limit (api.ratelimit)
        _add_response(
            responses,
            "429",
            "rate_limit_exceeded: the tenant's request rate (DAMA_RATE_LIMIT) is used up; or "
            "too_many_failed_authentications: this address sent too many invalid API keys "
            "(DAMA_AUTH_FAILURE_LIMIT). Retry-After says when to retry.",
            error_content,
        )


def _add_response(responses: dict[str, Any], status: str, description: str, content: dict[str, Any]) -> None:
    """Document a status every route may answer; a route that declares the same status for causes of its own
    keeps them, and the common ones are added to its description."""
    own = responses.get(status)
    if own is None:
        responses[status] = {"description": description, "content": content}
    elif description not in own.get("description", ""):
        own["description"] = f"{own.get('description', '').rstrip()} Also: {description}".strip()
        own.setdefault("content", content)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    template = "#/components/schemas/{model}"
    for model in (ErrorResponse, DatasetUpload):
        definition = model.model_json_schema(ref_template=template)
        for name, nested in definition.pop("$defs", {}).items():
            schemas.setdefault(name, nested)
        schemas[model.__name__] = definition
    _replace_refs(document, "#/components/schemas/HTTPValidationError", "#/components/schemas/ErrorResponse")
    error_content = {"application/json": {"schema": {"$ref": template.format(model="ErrorResponse")}}}
    for paths in document.get("paths", {}).values():
        for operation in paths.values():
            _document_common_errors(operation, error_content)
            _document_parameters(operation)
    _document_rules(document["paths"])
    _add_links(document["paths"])
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    _describe_spec_fields(schemas)
    app.openapi_schema = document
    return document
