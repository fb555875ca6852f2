"""Switching the served model without downtime (what `rice reindex` calls on every replica)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from service.auth import require_admin
from service.routes.deps import ServingDep

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class ModelSwitch(BaseModel):
    checkpoint: str | None = Field(None, description="checkpoint path on the server; null = the built-in ImageNet encoder")
    min_gallery_items: int = Field(0, ge=0, description="refuse the switch if the new model's gallery has fewer items")


@router.post("/model")
async def switch_model(body: ModelSwitch, serving: ServingDep) -> dict[str, Any]:
    """Load a checkpoint, warm it up and load its gallery namespace beside the serving model, then
    swap model and gallery together. Requests already running finish on the old pair; every answer
    comes from one model and that model's gallery. 409 while another switch runs."""
    # Not the counted State dependency: this request must not wait for itself to finish.
    return asdict(await serving.switch(body.checkpoint, body.min_gallery_items))
