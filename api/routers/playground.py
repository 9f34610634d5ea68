"""``/playground``: what the console's side-by-side chat needs besides ``/v1``: answers marked against a row."""

from __future__ import annotations

from fastapi import APIRouter

from api.chat_schemas import JudgeCreate, JudgePublic
from api.deps import CurrentTenant, ServicesDep, SessionDep
from api.responses import DATASET_NOT_FOUND, UNAUTHORIZED, error
from api.services import chat

router = APIRouter(prefix="/playground", tags=["chat"])


@router.post(
    "/judge",
    summary="Mark answers against what is in an image",
    description="Each answer's object mentions (character spans), hallucinated or grounded by the CHAIR matcher the "
    "evaluations use, and the objects covered and missed, for a row of a generative set (its preview rows). The "
    "matcher runs in the inference backend (`dama infer`); the API stays free of the engine.",
    responses={
        400: error("not_generative: the dataset is not a generative set."),
        401: UNAUTHORIZED,
        404: DATASET_NOT_FOUND,
        409: error("preview_outdated: the dataset's preview predates marking; upload the set again."),
        503: error("inference_unavailable: no `dama infer` backend to run the matcher."),
    },
)
async def judge(body: JudgeCreate, session: SessionDep, tenant: CurrentTenant, services: ServicesDep) -> JudgePublic:
    return await chat.judge(services, session, tenant_id=tenant.id, body=body)
