"""Models and their thresholds over HTTP (scope ``admin``): which threshold applies and where it came from,
and the newest calibration report. Calibrating itself is CPU-heavy (a product of every encoding with every
other), so it runs from the CLI, ``appliance models calibrate``, not inside an API worker."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from appliance import calibration
from appliance.api.deps import AdminKey, StateDep
from appliance.api.openapi import problems
from appliance.errors import NotFound

router = APIRouter(prefix="/v1", tags=["models"])
ModelName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="A configured model.")]


class Calibrated(BaseModel):
    version: int
    threshold: float
    track_threshold: float | None = Field(description="null: applied before track thresholds existed (the track "
                                                      "then uses `threshold`).")
    target_far: float | None
    created_at: datetime
    created_by: str


class ModelInfo(BaseModel):
    model: str
    dim: int
    threshold: float = Field(description="What a frame's decision applies when the request names no `threshold`.")
    track_threshold: float = Field(description="What a track's fused decision applies when the request names no "
                                               "`threshold` (docs/api.md, \"Track fusion\").")
    source: str = Field(description='Where both come from: "configured default", or "calibrated vN at <time> by '
                                    '<actor>".')
    default_threshold: float = Field(description="The configured default (settings `models`).")
    default_track_threshold: float = Field(description="The configured default of the track threshold.")
    calibrated: Calibrated | None = Field(description="The applied calibration, when one applies.")


class CalibrationOut(BaseModel):
    model: str
    version: int
    applied: bool
    threshold: float | None
    track_threshold: float | None
    created_at: datetime
    created_by: str
    report: dict[str, Any] = Field(description="vector.calibration.Report: counts, operating points, EER, curve.")


@router.get("/models", response_model=list[ModelInfo], summary="Configured models and the threshold each applies")
def list_models(_: AdminKey, state: StateDep) -> list[ModelInfo]:
    refresher = state.thresholds
    if refresher is None or not refresher.loaded:  # this worker has not read PostgreSQL yet: read it now
        with state.pool.connection() as conn:
            found = calibration.applied_thresholds(conn)
    else:
        found = refresher.applied
    out = []
    for name, spec in state.settings.models.items():
        row = found.get(name)
        cal = None
        if row is not None and row.threshold is not None:
            cal = Calibrated(version=row.version, threshold=row.threshold, track_threshold=row.track_threshold,
                             target_far=row.target_far, created_at=row.created_at, created_by=row.created_by)
        threshold, track_threshold = calibration.thresholds_of(row, spec.threshold, spec.fused_threshold)
        out.append(ModelInfo(model=name, dim=spec.dim, threshold=threshold, track_threshold=track_threshold,
                             source=calibration.source_of(row), default_threshold=spec.threshold,
                             default_track_threshold=spec.fused_threshold, calibrated=cal))
    return out


@router.get("/models/{model}/calibration", response_model=CalibrationOut, responses=problems(404),
            summary="The newest calibration report of a model (applied or not)")
def latest_calibration(model: ModelName, _: AdminKey, state: StateDep) -> CalibrationOut:
    if model not in state.settings.models:
        raise NotFound(f"no configured model {model!r}")
    with state.pool.connection() as conn:
        found = calibration.latest(conn, model)
    if found is None:
        raise NotFound(f"model {model!r} has no calibration yet: run `appliance models calibrate --model {model}`")
    return CalibrationOut(model=model, **found)
