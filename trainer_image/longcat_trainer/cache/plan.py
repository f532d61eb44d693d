"""Cache keys and plans: pure functions from the job, the manifest and the encoders' identity to entry names.

Entry names are hashes of everything that determines their content: the object's location, key and ETag,
the dataset's frames, resolution and bucket grid, and the identity of the encoder (its config and weight
files). A second job on the same data and model finds every entry and encodes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from longcat_job.api import DatasetSpec, JobSpec, LocalLocation, Location
from longcat_job.sample_manifest import Manifest, ManifestSample

from ..data.entries import Ref

CACHE_VERSION = "1"  # bump when the entry format or the preprocessing changes
NEGATIVE_PROMPT = ""


def model_identity(folder: Path) -> str:
    """Hash of a model folder's config files and its weight files' names and sizes (cheap, no weights read)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json" or path.name.endswith(".model"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix == ".safetensors" or path.suffix == ".bin":
            digest.update(f"{path.name}\0{path.stat().st_size}".encode())
    return digest.hexdigest()[:32]


def _hash(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in (CACHE_VERSION, *parts)).encode()).hexdigest()[:40]


def cache_location(spec: JobSpec, dataset: DatasetSpec) -> Location:
    if dataset.vae_cache is not None:
        return dataset.vae_cache
    return sub_location(spec.output, f"cache/{dataset.id}/")


def sub_location(location: Location, sub: str) -> Location:
    if location.s3 is not None:
        prefix = location.s3.prefix.rstrip("/")
        joined = f"{prefix}/{sub}" if prefix else sub
        return Location(s3=location.s3.model_copy(update={"prefix": joined}))
    assert location.local is not None
    return Location(local=LocalLocation(path=str(Path(location.local.path.removeprefix("file://")) / sub)))


@dataclass(frozen=True)
class Plan:
    """The cache entries one manifest sample needs."""

    dataset_id: str
    sample: ManifestSample
    conditioning_id: str
    clip: Ref
    start: Ref
    text: Ref
    bad: Ref

    @property
    def name(self) -> str:
        return f"{self.dataset_id}/{self.sample.clip.key}"


def plan_sample(
    spec: JobSpec, manifest: Manifest, dataset_id: str, sample: ManifestSample, identity: tuple[str, str]
) -> Plan:
    vae_id, text_id = identity
    dataset = spec.dataset(dataset_id)
    conditioning_id = dataset.conditioning_data[0]  # the first start-frame dataset names the pair
    locations = {d.id: d for d in manifest.datasets}
    clip_loc = locations[dataset_id].location
    start_loc = locations[dataset_id].conditioning[conditioning_id]
    # frameBuckets join the key only when set, so that the entries of jobs without them keep their names.
    frames = dataset.frames if dataset.frame_buckets is None else "buckets:" + ",".join(map(str, dataset.frame_counts()))
    shape = (frames, dataset.resolution, spec.aspect_bucket_alignment)
    clip_hash = _hash("clip", clip_loc, sample.clip.key, sample.clip.etag, *shape, vae_id)
    start = sample.start_frames[conditioning_id]
    # The start frame goes into its clip's bucket, so the clip's identity is part of its key.
    start_hash = _hash(
        "start", start_loc, start.key, start.etag, clip_loc, sample.clip.key, sample.clip.etag, *shape, vae_id
    )
    caption = sample.caption
    text_hash = _hash("text", clip_loc, caption.key, caption.etag, text_id) if caption else _hash("prompt", "", text_id)
    return Plan(
        dataset_id=dataset_id,
        sample=sample,
        conditioning_id=conditioning_id,
        clip=Ref(dataset_id, f"vae/{clip_hash}.safetensors"),
        start=Ref(conditioning_id, f"vae/{start_hash}.safetensors"),
        text=Ref(dataset_id, f"text/{text_hash}.safetensors"),
        bad=Ref(dataset_id, f"bad/{clip_hash}.json"),
    )


def negative_ref(dataset_id: str, text_identity: str) -> Ref:
    """The empty negative prompt's text states, kept in the cache of `dataset_id`."""
    return Ref(dataset_id, f"text/{_hash('prompt', NEGATIVE_PROMPT, text_identity)}.safetensors")
