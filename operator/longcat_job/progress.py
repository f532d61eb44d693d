"""`progress.json`: what the trainer's rank 0 reports under the job's output location.

Torch-free, so the operator reads the same model the trainer writes; `progress` and `artifacts` are the
job status's own `Progress` and `Artifacts`, so the operator mirrors them into status without conversion.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .api import ApiModel, Artifacts, Progress
from .failures import FailureReason
from .output_layout import PROGRESS as PROGRESS_KEY

Phase = Literal["Starting", "Caching", "Training", "Succeeded", "Failed", "Preempted"]


class CacheCounts(ApiModel):
    """Entries of the latent and text caches this run found (hits) or had to encode (misses)."""

    hits: int = Field(0, ge=0)
    misses: int = Field(0, ge=0)


class BadSamples(ApiModel):
    """Samples skipped because their files could not be used (corrupt clip, wrong start frame, empty caption)."""

    count: int = Field(0, ge=0)
    total: int = Field(0, ge=0, description="Samples examined, bad ones included.")
    too_short: int = Field(0, ge=0, description="Clips shorter than the dataset's smallest frame bucket (skipped).")
    examples: list[str] = Field(default_factory=list, max_length=20, description="'dataset/key: reason' lines.")


class Failure(ApiModel):
    reason: FailureReason = Field(strict=False)
    message: str


class TrainerProgress(ApiModel):
    phase: Phase = "Starting"
    progress: Progress = Field(default_factory=Progress)
    artifacts: Artifacts = Field(default_factory=Artifacts)
    cache: CacheCounts = Field(default_factory=CacheCounts)
    bad_samples: BadSamples = Field(default_factory=BadSamples)
    world_size: int = Field(1, ge=1)
    failure: Failure | None = None
    updated: datetime = Field(strict=False)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=1, exclude_none=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TrainerProgress:
        return cls.model_validate_json(data, strict=False)
