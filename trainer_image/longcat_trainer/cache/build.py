"""Filling the caches before training, across the ranks, and gathering what every rank found.

The samples with missing entries are split over the ranks (every world_size-th); the encoders are loaded only
where there is work and freed (GPU memory included) when caching ends. A sample that cannot be used gets a
`bad/` marker with the reason, so the next run skips it without decoding it again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longcat_job.api import JobSpec
from longcat_job.sample_manifest import Manifest
from longcat_job.storage import ObjectStore

from .. import distributed
from ..data.entries import Layout, Ref, TrainSample, read_layout
from ..data.shards import ShardReader
from ..data.video import BadSampleError, ClipTooShortError
from ..distributed import World
from ..metrics import RateLog
from .fill import Encoders, encode_missing, put_entry
from .plan import NEGATIVE_PROMPT, model_identity, negative_ref, plan_sample

log = logging.getLogger(__name__)


@dataclass
class CacheResult:
    samples: list[TrainSample]
    negative: Ref
    hits: int = 0
    misses: int = 0
    bad: list[str] = field(default_factory=list)  # reasons, each naming its file
    too_short: int = 0
    total: int = 0


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
    negative = negative_ref(negative_store, identity[1])
    have = distributed.broadcast_object(_listing(stores) if world.is_main else None)

    marked_bad = [p for p in plans if p.bad in have]
    # A sample known to be bad needs only its marker; the others need their three entries.
    entries = {ref for p in plans if p.bad not in have for ref in (p.clip, p.start, p.text)} | {negative}
    todo = [p for p in plans if p.bad not in have and not {p.clip, p.start, p.text} <= have]
    hits = len(entries & have) + len(marked_bad)
    misses = len(entries - have)
    mine = todo[world.rank :: world.world_size]
    # Layouts of complete samples come from their entries' headers, read by the ranks in turn.
    done_plans = [p for p in plans if p.bad not in have and {p.clip, p.start, p.text} <= have]
    log.info("cache: %d samples, %d entries found, %d to encode (%d samples, %d on this rank)",
             len(plans), hits, misses, len(todo), len(mine))

    encoders = Encoders(model_root, world.device, dtype)
    layouts: dict[str, Layout] = {}
    bad: list[tuple[str, str, bool]] = []  # name, reason, too short
    progress = RateLog(f"cache (rank {world.rank})", len(mine), " samples")
    try:
        for i, plan in enumerate(mine):
            try:
                layouts[plan.name] = encode_missing(plan, spec, reader, stores, encoders, have)
            except BadSampleError as exc:
                log.warning("skipping sample %s: %s", plan.name, exc)
                short = isinstance(exc, ClipTooShortError)
                marker = json.dumps({"reason": str(exc), "tooShort": short}).encode()
                stores[plan.bad.store].put_bytes(plan.bad.key, marker)
                bad.append((plan.name, str(exc), short))
            progress.update(i + 1)
        if world.is_main and negative not in have:
            put_entry(stores[negative.store], negative.key, encoders.text(NEGATIVE_PROMPT))
        for plan in done_plans[world.rank :: world.world_size]:
            layouts[plan.name] = read_layout(stores[plan.clip.store], plan.clip.key)
        for plan in marked_bad[world.rank :: world.world_size]:
            marker = json.loads(stores[plan.bad.store].get_bytes(plan.bad.key))
            bad.append((plan.name, marker["reason"], marker.get("tooShort", False)))
    finally:
        encoders.close()

    all_layouts: dict[str, Layout] = {}
    all_bad: list[tuple[str, str, bool]] = []
    for rank_layouts, rank_bad in distributed.gather_objects((layouts, bad)):
        all_layouts.update(rank_layouts)
        all_bad.extend(rank_bad)
    samples = [
        TrainSample(name=p.name, clip=p.clip, start=p.start, text=p.text, layout=all_layouts[p.name],
                    caption_dropout=spec.dataset(p.dataset_id).caption_dropout)
        for p in plans
        if p.name in all_layouts
    ]
    all_bad.sort()
    return CacheResult(
        samples=samples,
        negative=negative,
        hits=hits,
        misses=misses,
        bad=[reason for _, reason, _ in all_bad],  # each reason names its file
        too_short=sum(short for _, _, short in all_bad),
        total=len(plans),
    )
