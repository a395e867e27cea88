"""GDPR over HTTP (scope ``admin``): erasure with a signed receipt, its progress, and the access export."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from appliance.api.deps import AdminKey, StateDep
from appliance.api.openapi import problems
from appliance.gdpr import erasure
from appliance.gdpr.export import access_archive

router = APIRouter(prefix="/v1", tags=["gdpr"])


class ErasureOut(BaseModel):
    id: uuid.UUID
    subject_id: uuid.UUID
    state: str = Field(description="pending | running | failed | done")
    step: str | None = Field(description="The last step completed.")
    steps: dict[str, str] = Field(description="Completed steps and when.")
    error: str | None = None
    receipt: dict[str, Any] | None = Field(description="The signed erasure receipt once done.")
    receipt_signature: str | None = Field(description="Hex Ed25519 signature over the receipt's canonical JSON.")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, job: dict[str, Any]) -> ErasureOut:
        progress = job["progress"] or {}
        return cls(id=job["id"], subject_id=job["subject_id"], state=job["state"], step=job["step"],
                   steps=progress.get("steps", {}), error=progress.get("error"), receipt=job["receipt"],
                   receipt_signature=job["receipt_signature"], created_at=job["created_at"],
                   updated_at=job["updated_at"], finished_at=job["finished_at"])


@router.delete("/subjects/{subject_id}", response_model=ErasureOut, responses={
    200: {"links": {"GetErasure": {"operationId": "get_erasure_v1_erasures__job_id__get",
                                   "parameters": {"job_id": "$response.body#/id"},
                                   "description": "The erasure job: its progress, then its signed receipt."}}},
    **problems(409)},
               summary="Erase a subject: tombstone, delete, crypto-shred, VACUUM; returns the signed receipt")
def erase_subject(subject_id: uuid.UUID, request: Request, key: AdminKey, state: StateDep) -> ErasureOut:
    job_id = erasure.start_erasure(state, subject_id, key.actor, getattr(request.state, "request_id", None))
    return ErasureOut.of(erasure.run_erasure(state, job_id))


@router.get("/erasures/{job_id}", response_model=ErasureOut, summary="Progress and receipt of an erasure")
def get_erasure(job_id: uuid.UUID, _: AdminKey, state: StateDep) -> ErasureOut:
    return ErasureOut.of(erasure.job_status(state, job_id))


@router.get("/subjects/{subject_id}/export", summary="Access/portability export: a signed zip of the subject's data",
            response_class=StreamingResponse, responses={200: {
                "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                "headers": {"Content-Disposition": {"required": True, "schema": {"type": "string"}}}},
                **problems(409)})
def export_subject(subject_id: uuid.UUID, request: Request, key: AdminKey, state: StateDep) -> StreamingResponse:
    body = access_archive(state, subject_id, key.actor, getattr(request.state, "request_id", None))
    return StreamingResponse(body, media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="subject-{subject_id}.zip"',
                                      "Cache-Control": "no-store"})
