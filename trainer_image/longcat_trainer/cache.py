"""Content-addressed caches of VAE latents and text embeddings, filled by all ranks before training.

Where: each dataset's cache location (`vaeCache`, or `<output>/cache/<dataset id>/`), as SimpleTuner's
`cache_dir_vae`: clip latents in the clip dataset's cache, start-frame latents in the conditioning
dataset's (separate caches, as the seed asks), caption and negative-prompt embeddings under the clip
dataset's `text/`.

Entry names are hashes of everything that determines their content: the object's location, key and ETag,
the dataset's frames, resolution and bucket grid, and the identity of the encoder (its config and weight
files). A second job on the same data and model finds every entry and encodes nothing. A sample that
cannot be used gets a `bad/` marker with the reason, so the next run skips it without decoding it again.

Sharding: the samples with missing entries are split over the ranks (every world_size-th); the encoders
are loaded only where there is work and freed (GPU memory included) when caching ends.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from longcat_operator.api import DatasetSpec, JobSpec, LocalLocation, Location
from longcat_operator.manifest import Manifest, ManifestSample
from longcat_operator.storage import ObjectStore

from . import distributed
from .data.reader import ShardReader
from .data.video import BadSampleError, Bucket, ClipTooShortError, prepare_sample
from .distributed import World
from .metrics import RateLog
from .model import encode, loading

log = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when the entry format or the preprocessing changes
NEGATIVE_PROMPT = ""
MAX_BAD_EXAMPLES = 20


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
class Ref:
    """One cache entry: the dataset whose cache holds it, and its key there."""

    store: str
    key: str


@dataclass(frozen=True)
class TrainSample:
    name: str  # dataset/stem, for messages
    clip: Ref
    start: Ref
    text: Ref
    bucket: Bucket


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


@dataclass
class CacheResult:
    samples: list[TrainSample]
    negative: Ref
    hits: int = 0
    misses: int = 0
    bad: list[str] = field(default_factory=list)  # reasons, each naming its file
    too_short: int = 0
    total: int = 0


def plan_sample(
    spec: JobSpec, manifest: Manifest, dataset_id: str, sample: ManifestSample, identity: tuple[str, str]
) -> Plan:
    vae_id, text_id = identity
    dataset = spec.dataset(dataset_id)
    conditioning_id = dataset.conditioning_data[0]  # the first start-frame dataset names the pair
    locations = {d.id: d for d in manifest.datasets}
    clip_loc = locations[dataset_id].location
    start_loc = locations[dataset_id].conditioning[conditioning_id]
    shape = (dataset.frames, dataset.resolution, spec.aspect_bucket_alignment)
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


def read_entry(store: ObjectStore, key: str) -> dict[str, torch.Tensor]:
    return load_safetensors(store.get_bytes(key))


def read_bucket(store: ObjectStore, key: str) -> Bucket:
    """The bucket in a latent entry's safetensors header, read without fetching the tensors."""
    with store.open_ranged(key) as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return Bucket.parse(header["__metadata__"]["bucket"])


class Encoders:
    """The VAE, text encoder and tokenizer, loaded on first use and freed by `close`."""

    def __init__(self, model_root: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.root, self.device, self.dtype = model_root, device, dtype
        self._vae: AutoencoderKLWan | None = None
        self._text: tuple[PreTrainedTokenizerBase, UMT5EncoderModel] | None = None

    def vae(self) -> AutoencoderKLWan:
        if self._vae is None:
            # float32: latents are encoded once and trained on many times.
            self._vae = loading.load_vae(self.root, dtype=torch.float32, device=self.device).eval()
        return self._vae

    def text(self, prompt: str) -> dict[str, torch.Tensor]:
        if self._text is None:
            self._text = (loading.load_tokenizer(self.root),
                          loading.load_text_encoder(self.root, dtype=self.dtype, device=self.device))
        states, mask = encode.encode_prompts(*self._text, [prompt])
        # Only the real tokens are stored; `text_batch` pads back to MAX_TEXT_TOKENS with zeros.
        return {"states": states[0, 0, : int(mask.sum())].float().cpu().contiguous()}

    def close(self) -> None:
        self._vae = self._text = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def text_batch(
    entries: list[dict[str, torch.Tensor]], max_length: int = encode.MAX_TEXT_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored caption states -> states [B, 1, max_length, D] zero-padded and mask [B, max_length], as encoded."""
    width = entries[0]["states"].shape[-1]
    states = torch.zeros(len(entries), 1, max_length, width)
    mask = torch.zeros(len(entries), max_length, dtype=torch.int64)
    for i, entry in enumerate(entries):
        n = entry["states"].shape[0]
        states[i, 0, :n] = entry["states"]
        mask[i, :n] = 1
    return states, mask


def _put(store: ObjectStore, key: str, tensors: dict[str, torch.Tensor], bucket: Bucket | None = None) -> None:
    metadata = {"bucket": str(bucket)} if bucket else {}
    store.put_bytes(key, save_safetensors(tensors, metadata=metadata))


def _encode_plan(
    plan: Plan, spec: JobSpec, reader: ShardReader, stores: dict[str, ObjectStore], encoders: Encoders, have: set[Ref]
) -> Bucket:
    """Fill the missing entries of one sample; raises BadSampleError for unusable input."""
    dataset = spec.dataset(plan.dataset_id)
    bucket: Bucket | None = None
    if plan.clip not in have or plan.start not in have:
        # A ReadError (S3 unreachable, object changed since the manifest) is not bad data: it fails the job.
        clip = reader.fetch(plan.dataset_id, plan.sample.clip)
        frame = reader.fetch(plan.conditioning_id, plan.sample.start_frames[plan.conditioning_id])
        prepared = prepare_sample(
            clip, frame, frames=dataset.frames, resolution=dataset.resolution, alignment=spec.aspect_bucket_alignment,
            clip_name=plan.name,
            frame_name=f"{plan.conditioning_id}/{plan.sample.start_frames[plan.conditioning_id].key}",
        )
        bucket = prepared.bucket
        vae = encoders.vae()
        latents = encode.encode_video_latents(vae, prepared.video[None])
        start = encode.encode_video_latents(vae, prepared.start_frame[None])
        _put(stores[plan.clip.store], plan.clip.key, {"latents": latents[0].float().cpu().contiguous()}, bucket)
        _put(stores[plan.start.store], plan.start.key, {"latents": start[0].float().cpu().contiguous()}, bucket)
    if plan.text not in have:
        caption = ""
        if plan.sample.caption is not None:
            caption = reader.fetch(plan.dataset_id, plan.sample.caption).read_text(encoding="utf-8", errors="replace")
            if not caption.strip():
                raise BadSampleError(
                    f"{plan.dataset_id}/{plan.sample.caption.key}: empty caption; write the caption or drop the clip"
                )
        _put(stores[plan.text.store], plan.text.key, encoders.text(caption))
    return bucket or read_bucket(stores[plan.clip.store], plan.clip.key)


def _listing(stores: dict[str, ObjectStore]) -> set[Ref]:
    have: set[Ref] = set()
    for store_id, store in stores.items():
        try:
            have.update(Ref(store_id, r.key) for r in store.list())
        except FileNotFoundError:  # a local cache directory not created yet
            continue
    return have


def build_caches(
    spec: JobSpec,
    manifest: Manifest,
    world: World,
    reader: ShardReader,
    stores: dict[str, ObjectStore],
    model_root: Path,
    dtype: torch.dtype,
) -> CacheResult:
    """Make sure every training sample's entries exist; returns the usable samples, the same on every rank."""
    identity = (model_identity(model_root / "vae"), model_identity(model_root / "text_encoder"))
    plans = [plan_sample(spec, manifest, ds, s, identity) for ds, s in manifest.split("train")]
    negative_store = plans[0].dataset_id if plans else spec.training_datasets()[0].id
    negative = Ref(negative_store, f"text/{_hash('prompt', NEGATIVE_PROMPT, identity[1])}.safetensors")
    have = distributed.broadcast_object(_listing(stores) if world.is_main else None)

    marked_bad = [p for p in plans if p.bad in have]
    # A sample known to be bad needs only its marker; the others need their three entries.
    entries = {ref for p in plans if p.bad not in have for ref in (p.clip, p.start, p.text)} | {negative}
    todo = [p for p in plans if p.bad not in have and not {p.clip, p.start, p.text} <= have]
    hits = len(entries & have) + len(marked_bad)
    misses = len(entries - have)
    mine = todo[world.rank :: world.world_size]
    # Buckets of complete samples come from their entries' headers, read by the ranks in turn.
    done_plans = [p for p in plans if p.bad not in have and {p.clip, p.start, p.text} <= have]
    log.info("cache: %d samples, %d entries found, %d to encode (%d samples, %d on this rank)",
             len(plans), hits, misses, len(todo), len(mine))

    encoders = Encoders(model_root, world.device, dtype)
    buckets: dict[str, Bucket] = {}
    bad: list[tuple[str, str, bool]] = []  # name, reason, too short
    progress = RateLog(f"cache (rank {world.rank})", len(mine), " samples")
    try:
        for i, plan in enumerate(mine):
            try:
                buckets[plan.name] = _encode_plan(plan, spec, reader, stores, encoders, have)
            except BadSampleError as exc:
                log.warning("skipping sample %s: %s", plan.name, exc)
                short = isinstance(exc, ClipTooShortError)
                marker = json.dumps({"reason": str(exc), "tooShort": short}).encode()
                stores[plan.bad.store].put_bytes(plan.bad.key, marker)
                bad.append((plan.name, str(exc), short))
            progress.update(i + 1)
        if world.is_main and negative not in have:
            _put(stores[negative.store], negative.key, encoders.text(NEGATIVE_PROMPT))
        for plan in done_plans[world.rank :: world.world_size]:
            buckets[plan.name] = read_bucket(stores[plan.clip.store], plan.clip.key)
        for plan in marked_bad[world.rank :: world.world_size]:
            marker = json.loads(stores[plan.bad.store].get_bytes(plan.bad.key))
            bad.append((plan.name, marker["reason"], marker.get("tooShort", False)))
    finally:
        encoders.close()

    all_buckets: dict[str, Bucket] = {}
    all_bad: list[tuple[str, str, bool]] = []
    for rank_buckets, rank_bad in distributed.gather_objects((buckets, bad)):
        all_buckets.update(rank_buckets)
        all_bad.extend(rank_bad)
    samples = [
        TrainSample(name=p.name, clip=p.clip, start=p.start, text=p.text, bucket=all_buckets[p.name])
        for p in plans
        if p.name in all_buckets
    ]
    all_bad.sort()
    return CacheResult(
        samples=samples,
        negative=negative,
        hits=hits,
        misses=misses,
        bad=[reason for _, reason, short in all_bad if not short],  # each reason names its file
        too_short=sum(short for _, _, short in all_bad),
        total=len(plans),
    )
