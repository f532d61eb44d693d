"""The frozen sample manifest: `manifest.json` under the job's output location.

Written once by preflight. A resumed or restarted job trains on exactly these objects (the reader checks
each ETag and size), and a later job compares fingerprints to tell whether its caches still apply.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import output_layout
from .api import JobSpec
from .failures import InvalidConfigError
from .preflight import PreflightResult
from .storage import ObjectRecord, ObjectStore

MANIFEST_KEY = output_layout.MANIFEST
Split = Literal["train", "validation"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ManifestObject(_Frozen):
    key: str = Field(description="Key relative to the dataset's location.")
    etag: str
    size: int = Field(ge=0)

    @classmethod
    def of(cls, record: ObjectRecord) -> ManifestObject:
        return cls(key=record.key, etag=record.etag, size=record.size)


class ManifestSample(_Frozen):
    stem: str
    clip: ManifestObject
    caption: ManifestObject | None = None
    start_frames: dict[str, ManifestObject] = Field(description="Conditioning dataset id -> its start frame.")


class ManifestExcluded(_Frozen):
    """A clip preflight left out (the job tolerates up to maxBadSampleFraction of them), and why."""

    key: str
    reason: str


class ManifestDataset(_Frozen):
    id: str
    split: Split
    location: str
    conditioning: dict[str, str] = Field(description="Conditioning dataset id -> its location.")
    samples: list[ManifestSample]
    excluded: list[ManifestExcluded] = Field(default_factory=list)

    def fingerprint(self) -> str:
        """Changes when any sample's object (location, key, ETag or size) changes; not with the job."""
        return _digest(self.model_dump(mode="json", exclude={"split", "excluded"}))


class Manifest(_Frozen):
    version: Literal[1] = 1
    job: str
    created: datetime
    datasets: list[ManifestDataset]

    def fingerprint(self) -> str:
        return _digest([d.model_dump(mode="json") for d in self.datasets])

    def excluded(self, split: Split) -> list[str]:
        """'<dataset>/<key>: <reason>' of every clip of the split that preflight left out."""
        return [f"{d.id}/{e.key}: {e.reason}" for d in self.datasets if d.split == split for e in d.excluded]

    def split(self, split: Split) -> list[tuple[str, ManifestSample]]:
        """(dataset id, sample) of every dataset of the split, in manifest order."""
        return [(d.id, s) for d in self.datasets if d.split == split for s in d.samples]

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode()


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ManifestError(InvalidConfigError):
    """manifest.json cannot be read as a manifest; the message says to delete it."""


def build_manifest(job: str, spec: JobSpec, result: PreflightResult) -> Manifest:
    """Freeze the complete samples of every video dataset preflight paired."""
    splits = {d.id: d.role for d in result.report.datasets}
    return Manifest(
        job=job,
        created=datetime.now(UTC),
        datasets=[
            ManifestDataset(
                id=dataset_id,
                split=splits[dataset_id],
                location=result.stores[dataset_id].url,
                conditioning={cid: result.stores[cid].url for cid in spec.dataset(dataset_id).conditioning_data},
                samples=[
                    ManifestSample(
                        stem=s.stem,
                        clip=ManifestObject.of(s.clip),
                        caption=ManifestObject.of(s.caption) if s.caption else None,
                        start_frames={cid: ManifestObject.of(r) for cid, r in s.start_frames.items()},
                    )
                    for s in samples
                ],
                excluded=[ManifestExcluded(key=e.key, reason=e.reason) for e in result.excluded
                          if e.dataset_id == dataset_id],
            )
            for dataset_id, samples in result.samples.items()
        ],
    )


def write_manifest(store: ObjectStore, manifest: Manifest) -> str:
    """Write it under the output location; returns its URI."""
    store.put_bytes(MANIFEST_KEY, manifest.to_json())
    return f"{store.url.rstrip('/')}/{MANIFEST_KEY}"


def read_manifest(store: ObjectStore) -> Manifest:
    try:
        return Manifest.model_validate_json(store.get_bytes(MANIFEST_KEY))
    except ValidationError as exc:
        raise ManifestError(
            f"{store.url.rstrip('/')}/{MANIFEST_KEY} is not a valid manifest ({exc.error_count()} errors, first: "
            f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}): delete it to run preflight again"
        ) from None
