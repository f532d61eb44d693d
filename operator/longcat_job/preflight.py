"""Preflight: everything about a job's data that can be checked before any GPU is asked for.

Lists every dataset the job uses (S3 prefixes or local directories), pairs clips with start frames and
captions (`pairing.py`), and reports exact counts with the first problems of each kind by key. The optional
deep check reads clip headers with PyAV through ranged reads (no whole downloads) and every caption.
Torch-free; PyAV is imported only by the deep check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from .api import DatasetSpec, DatasetStatus, JobSpec
from .pairing import (
    CLIP_EXTENSIONS,
    HINTS,
    IMAGE_EXTENSIONS,
    MAX_EXAMPLES,
    Classified,
    Listing,
    Paired,
    ProblemKind,
    ProblemList,
    Sample,
    classify,
    pair,
    report_orphan_start_frames,
)
from .s3 import S3AccessError
from .storage import (
    CredentialsLookup,
    ObjectRecord,
    ObjectStore,
    env_credentials,
    store_for,
)

log = logging.getLogger(__name__)

LIST_WORKERS = 8
DEEP_WORKERS = 8
PROGRESS_EVERY_S = 5.0

Role = Literal["train", "validation", "conditioning"]


class ProblemReport(BaseModel):
    kind: ProblemKind
    severity: Literal["error", "warning"]
    related_dataset: str | None = None
    count: int
    examples: list[str]
    hint: str


class DatasetReport(BaseModel):
    id: str
    role: Role
    location: str
    objects: int = 0
    media: int = 0  # clips of a video dataset, start frames of a conditioning dataset
    captions: int = 0
    samples: int = 0  # complete samples (video datasets)
    access_error: str | None = None
    problems: list[ProblemReport] = []

    @property
    def errors(self) -> int:
        return (self.access_error is not None) + sum(p.count for p in self.problems if p.severity == "error")

    def first_problems(self, limit: int = MAX_EXAMPLES) -> list[str]:
        """'Kind: key' lines, errors before warnings, for the job's status."""
        lines = [self.access_error] if self.access_error else []
        for problem in sorted(self.problems, key=lambda p: p.severity != "error"):
            lines += [f"{problem.kind.value}: {key}" for key in problem.examples]
        return lines[:limit]

    def to_status(self) -> DatasetStatus:
        return DatasetStatus(
            id=self.id,
            objects=self.objects,
            samples=self.samples,
            problems=self.errors,
            first_problems=self.first_problems(),
        )


class PreflightReport(BaseModel):
    datasets: list[DatasetReport]
    deep: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return all(d.errors == 0 for d in self.datasets)

    def dataset(self, dataset_id: str) -> DatasetReport:
        return next(d for d in self.datasets if d.id == dataset_id)

    def lines(self) -> list[str]:
        """A human summary: one line per dataset, then each kind of problem with its first keys."""
        out = []
        for d in self.datasets:
            noun = "start frames" if d.role == "conditioning" else "clips"
            head = f"{d.id} ({d.role}, {d.location}): {d.objects} objects, {d.media} {noun}"
            if d.role != "conditioning":
                head += f", {d.captions} captions, {d.samples} complete samples"
            out.append(head)
            if d.access_error:
                out.append(f"  error: {d.access_error}")
            for p in d.problems:
                related = f" (vs '{p.related_dataset}')" if p.related_dataset else ""
                out.append(f"  {p.severity} {p.kind.value}{related}: {p.count} -- {p.hint}")
                out += [f"    {key}" for key in p.examples]
                if p.count > len(p.examples):
                    out.append(f"    ... and {p.count - len(p.examples)} more")
        return out


@dataclass
class PreflightResult:
    report: PreflightReport
    samples: dict[str, list[Sample]]  # video dataset id -> complete samples
    stores: dict[str, ObjectStore]  # dataset id -> where its objects are


class _Progress:
    """Logs a line with count, rate and (when the total is known) ETA at most every PROGRESS_EVERY_S."""

    def __init__(self, what: str, total: int | None = None) -> None:
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self.last < PROGRESS_EVERY_S:
                return
            self.last = now
            rate = self.done / (now - self.start)
            eta = f", ETA {(self.total - self.done) / rate:.0f}s" if self.total and rate else ""
            of = f"/{self.total}" if self.total else ""
            log.info("%s: %d%s (%.0f/s%s)", self.what, self.done, of, rate, eta)


def datasets_in_use(spec: JobSpec) -> list[tuple[DatasetSpec, Role]]:
    """Training datasets, the validation split, and the conditioning datasets they name, in spec order."""
    eval_id = spec.validation.eval_dataset_id
    videos = {d.id for d in spec.datasets if d.type == "video"}
    conditioning = {c for d in spec.datasets if d.id in videos for c in d.conditioning_data}
    used: list[tuple[DatasetSpec, Role]] = []
    for d in spec.datasets:
        if d.id in videos:
            used.append((d, "validation" if d.id == eval_id else "train"))
        elif d.id in conditioning:
            used.append((d, "conditioning"))
    return used


def _list(store: ObjectStore, progress: _Progress) -> list[ObjectRecord]:
    records = []
    for record in store.list():
        records.append(record)
        progress.add()
    return records


def _problem_reports(problems: Iterable[ProblemList]) -> list[ProblemReport]:
    return [
        ProblemReport(
            kind=p.kind,
            severity="error" if p.is_error else "warning",
            related_dataset=p.related,
            count=p.count,
            examples=p.examples,
            hint=HINTS[p.kind],
        )
        for p in problems
    ]


def run_preflight(
    spec: JobSpec,
    *,
    credentials: CredentialsLookup = env_credentials,
    deep: bool = False,
    workers: int = LIST_WORKERS,
) -> PreflightResult:
    started = time.monotonic()
    used = datasets_in_use(spec)
    index = {d.id: i for i, d in enumerate(spec.datasets)}
    roles = {d.id: role for d, role in used}
    specs = {d.id: d for d, _ in used}
    stores: dict[str, ObjectStore] = {}
    for d, _ in used:
        place = "s3" if d.source.s3 else "local"
        stores[d.id] = store_for(
            d.source, what=f"dataset '{d.id}' (spec.datasets[{index[d.id]}].source.{place})", credentials=credentials
        )
    reports = {d.id: DatasetReport(id=d.id, role=role, location=stores[d.id].url) for d, role in used}

    progress = _Progress("preflight: objects listed")
    listings: dict[str, list[ObjectRecord]] = {}
    with ThreadPoolExecutor(max(1, min(workers, len(used)))) as pool:
        futures = {d.id: pool.submit(_list, stores[d.id], progress) for d, _ in used}
        for dataset_id, future in futures.items():
            try:
                listings[dataset_id] = future.result()
            except (S3AccessError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
                reports[dataset_id].access_error = str(exc)

    classified: dict[str, Classified] = {}
    for dataset_id, records in listings.items():
        is_video = roles[dataset_id] != "conditioning"
        classified[dataset_id] = classify(
            Listing(dataset_id, stores[dataset_id].url, records),
            media_extensions=CLIP_EXTENSIONS if is_video else IMAGE_EXTENSIONS,
            captions=is_video and specs[dataset_id].caption_strategy == "textfile",
        )

    paired: dict[str, Paired] = {}
    for dataset_id, c in classified.items():
        if roles[dataset_id] == "conditioning":
            continue
        start_frames = [classified[cid] for cid in specs[dataset_id].conditioning_data if cid in classified]
        paired[dataset_id] = pair(c, start_frames, captions=specs[dataset_id].caption_strategy == "textfile")
    for dataset_id, c in classified.items():
        if roles[dataset_id] == "conditioning":
            users = [classified[v] for v in paired if dataset_id in specs[v].conditioning_data]
            report_orphan_start_frames(c, users)

    samples = {dataset_id: p.samples for dataset_id, p in paired.items()}
    if deep:
        for dataset_id in paired:
            samples[dataset_id] = deep_check(
                specs[dataset_id], stores[dataset_id], samples[dataset_id], classified[dataset_id], workers
            )

    for dataset_id, c in classified.items():
        report = reports[dataset_id]
        report.objects = c.objects
        report.media = len(c.media)
        report.captions = len(c.captions)
        report.samples = len(samples.get(dataset_id, ()))
        report.problems = _problem_reports(c.problems.all())

    report = PreflightReport(
        datasets=[reports[d.id] for d, _ in used], deep=deep, seconds=round(time.monotonic() - started, 3)
    )
    log.info("preflight: %d objects in %d datasets, %.1fs, %s", progress.done, len(used), report.seconds,
             "ok" if report.ok else "problems found")
    return PreflightResult(report=report, samples=samples, stores=stores)


# --- deep check ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipHeader:
    frames: int
    width: int
    height: int


def read_clip_header(store: ObjectStore, key: str) -> ClipHeader:
    """Frame count and size from the container header; reads only what the demuxer asks for."""
    import av  # optional for the operator: only the deep check needs it

    with store.open_ranged(key) as raw, av.open(raw, mode="r") as container:
        stream = container.streams.video[0]
        frames = stream.frames
        if not frames and stream.duration is not None and stream.average_rate:
            # Containers without a frame count in the header (webm, mkv): estimate from duration and rate.
            frames = int(round(float(stream.duration * stream.time_base * stream.average_rate)))
        return ClipHeader(frames=int(frames or 0), width=stream.codec_context.width, height=stream.codec_context.height)


def _check_sample(spec: DatasetSpec, store: ObjectStore, sample: Sample) -> list[tuple[ProblemKind, str]]:
    import av

    found: list[tuple[ProblemKind, str]] = []
    try:
        header = read_clip_header(store, sample.clip.key)
    except (av.FFmpegError, IndexError, ValueError) as exc:
        log.debug("unreadable clip %s: %s", sample.clip.key, exc)
        found.append((ProblemKind.CLIP_UNREADABLE, sample.clip.key))
    else:
        if header.frames < spec.frames:
            found.append((ProblemKind.CLIP_TOO_SHORT, f"{sample.clip.key} ({header.frames} < {spec.frames} frames)"))
        if min(header.width, header.height) < spec.resolution:
            found.append(
                (ProblemKind.CLIP_TOO_SMALL, f"{sample.clip.key} ({header.width}x{header.height} < {spec.resolution})")
            )
    if sample.caption is not None and not store.get_bytes(sample.caption.key).decode(errors="replace").strip():
        found.append((ProblemKind.EMPTY_CAPTION, sample.caption.key))
    return found


def deep_check(
    spec: DatasetSpec, store: ObjectStore, samples: Sequence[Sample], classified: Classified, workers: int
) -> list[Sample]:
    """The samples that pass; problems go to `classified.problems`."""
    progress = _Progress(f"preflight deep check of '{spec.id}'", total=len(samples))
    kept = []

    def check(sample: Sample) -> list[tuple[ProblemKind, str]]:
        result = _check_sample(spec, store, sample)
        progress.add()
        return result

    with ThreadPoolExecutor(max(1, min(workers, DEEP_WORKERS))) as pool:
        for sample, found in zip(samples, pool.map(check, samples)):
            for kind, key in found:
                classified.problems.add(kind, key)
            if not found:
                kept.append(sample)
    return kept

