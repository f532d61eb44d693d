"""Preflight: everything about a job's data that can be checked before any GPU is asked for.

Lists every dataset the job uses (S3 prefixes or local directories), pairs clips with start frames and
captions (`pairing.py`), and, by default, reads each sample's files just far enough to know they can be trained
on (`sample_check.py`: clip header and first frame, start frame header, caption). It reports exact counts with
the first problems of each kind, each naming its file.

Three severities: an `error` stops the job (a dataset that cannot be read, two clips of one stem); a `sample`
problem makes one sample unusable (no start frame or caption, an unreadable or short clip, ...): the job runs
without those samples while they are at most `spec.training.maxBadSampleFraction` of all, and is refused above;
a `warning` names an object that is ignored. Torch-free; PyAV and Pillow are imported by the deep check only.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from .api import DatasetSpec, DatasetStatus, JobSpec
from .model_source import model_file_problems
from .pairing import (
    CLIP_EXTENSIONS,
    HINTS,
    IMAGE_EXTENSIONS,
    MAX_EXAMPLES,
    SAMPLE_KINDS,
    WARNINGS,
    Classified,
    Listing,
    ProblemKind,
    ProblemList,
    Sample,
    classify,
    pair,
    report_orphan_start_frames,
)
from .failures import InvalidConfigError
from .lora_files import init_problems, read_lora_folder
from .s3 import S3AccessError
from .sample_check import Checked, check_sample
from .storage import CredentialsLookup, ObjectRecord, ObjectStore, env_credentials, store_for

log = logging.getLogger(__name__)

LIST_WORKERS = 8
# The deep check waits on the network: more requests in flight than cores.
DEEP_WORKERS = 16
PROGRESS_EVERY_S = 5.0

Role = Literal["train", "validation", "conditioning"]
Severity = Literal["error", "sample", "warning"]
SEVERITY_ORDER: dict[str, int] = {"error": 0, "sample": 1, "warning": 2}


def severity_of(kind: ProblemKind) -> Severity:
    return "warning" if kind in WARNINGS else "sample" if kind in SAMPLE_KINDS else "error"


class ProblemReport(BaseModel):
    kind: ProblemKind
    severity: Severity
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
    samples: int = 0  # usable samples (video datasets)
    frame_buckets: dict[int, int] = {}  # frame count -> usable clips that train at it (deep check only)
    access_error: str | None = None
    problems: list[ProblemReport] = []

    @property
    def blocking(self) -> int:
        """Problems that stop the job whatever the other samples are."""
        return (self.access_error is not None) + sum(p.count for p in self.problems if p.severity == "error")

    @property
    def errors(self) -> int:
        """Every problem to fix: the blocking ones and the unusable samples (what status shows as `problems`)."""
        return self.blocking + sum(p.count for p in self.problems if p.severity == "sample")

    def first_problems(self, limit: int = MAX_EXAMPLES) -> list[str]:
        """'Kind: key' lines, errors first, then unusable samples, then warnings, for the job's status."""
        lines = [self.access_error] if self.access_error else []
        for problem in sorted(self.problems, key=lambda p: SEVERITY_ORDER[p.severity]):
            lines += [f"{problem.kind.value}: {key}" for key in problem.examples]
        return lines[:limit]

    def to_status(self) -> DatasetStatus:
        return DatasetStatus(id=self.id, objects=self.objects, samples=self.samples, problems=self.errors,
                             first_problems=self.first_problems())


class PreflightReport(BaseModel):
    datasets: list[DatasetReport]
    deep: bool
    seconds: float
    clips: int = 0  # clips of the video datasets, paired or not
    unusable: int = 0  # of them, the ones left out
    max_bad_fraction: float = 0.0
    # What the spec asks of its other sources that they cannot give: checkpoint files the model source lacks, a
    # spec.lora.initFrom of another rank or targets.
    spec_problems: list[str] = []

    @property
    def too_many_unusable(self) -> bool:
        return self.clips > 0 and self.unusable > self.max_bad_fraction * self.clips

    @property
    def ok(self) -> bool:
        return all(d.blocking == 0 for d in self.datasets) and not self.too_many_unusable \
            and not self.spec_problems

    def dataset(self, dataset_id: str) -> DatasetReport:
        return next(d for d in self.datasets if d.id == dataset_id)

    def lines(self) -> list[str]:
        """A human summary: the spec's problems, one line per dataset, then each kind of problem with its first
        keys."""
        out = [f"error: {problem}" for problem in self.spec_problems]
        for d in self.datasets:
            noun = "start frames" if d.role == "conditioning" else "clips"
            head = f"{d.id} ({d.role}, {d.location}): {d.objects} objects, {d.media} {noun}"
            if d.role != "conditioning":
                head += f", {d.captions} captions, {d.samples} usable samples"
            out.append(head)
            if len(d.frame_buckets) > 1:
                spread = ", ".join(f"{n} frames: {count}" for n, count in sorted(d.frame_buckets.items()))
                out.append(f"  clips per frame bucket: {spread}")
            if d.access_error:
                out.append(f"  error: {d.access_error}")
            for p in d.problems:
                related = f" (vs '{p.related_dataset}')" if p.related_dataset else ""
                out.append(f"  {p.severity} {p.kind.value}{related}: {p.count} -- {p.hint}")
                out += [f"    {key}" for key in p.examples]
                if p.count > len(p.examples):
                    out.append(f"    ... and {p.count - len(p.examples)} more")
        if self.unusable:
            verdict = ("more than spec.training.maxBadSampleFraction: fix or remove them" if self.too_many_unusable
                       else "within spec.training.maxBadSampleFraction: the job trains without them")
            out.append(f"{self.unusable} of {self.clips} samples are unusable "
                       f"({100 * self.unusable / self.clips:.1f} %, maxBadSampleFraction {self.max_bad_fraction}), "
                       f"{verdict}")
        return out


@dataclass(frozen=True)
class Excluded:
    """A clip left out of the manifest, and the first reason why."""

    dataset_id: str
    key: str
    reason: str


@dataclass
class PreflightResult:
    report: PreflightReport
    samples: dict[str, list[Sample]]  # video dataset id -> usable samples
    stores: dict[str, ObjectStore]  # dataset id -> where its objects are
    excluded: list[Excluded] = field(default_factory=list)


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


def _problem_reports(problems: Iterable[ProblemList]) -> list[ProblemReport]:
    return [ProblemReport(kind=p.kind, severity=severity_of(p.kind), related_dataset=p.related, count=p.count,
                          examples=p.examples, hint=HINTS[p.kind]) for p in problems]


def _stores(spec: JobSpec, used: list[tuple[DatasetSpec, Role]], credentials: CredentialsLookup
            ) -> dict[str, ObjectStore]:
    index = {d.id: i for i, d in enumerate(spec.datasets)}
    def what(d: DatasetSpec) -> str:
        return f"dataset '{d.id}' (spec.datasets[{index[d.id]}].source.{'s3' if d.source.s3 else 'local'})"

    return {d.id: store_for(d.source, credentials=credentials, what=what(d)) for d, _ in used}


def _list_all(stores: dict[str, ObjectStore], reports: dict[str, DatasetReport], workers: int
              ) -> dict[str, list[ObjectRecord]]:
    """Every dataset's objects, listed concurrently; a dataset that cannot be listed gets its access error."""
    progress = _Progress("preflight: objects listed")

    def listing(store: ObjectStore) -> list[ObjectRecord]:
        records = []
        for record in store.list():
            records.append(record)
            progress.add()
        return records

    listings: dict[str, list[ObjectRecord]] = {}
    with ThreadPoolExecutor(max(1, min(workers, len(stores)))) as pool:
        futures = {dataset_id: pool.submit(listing, store) for dataset_id, store in stores.items()}
        for dataset_id, future in futures.items():
            try:
                listings[dataset_id] = future.result()
            except (S3AccessError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
                reports[dataset_id].access_error = str(exc)
    return listings


def _pair_all(specs: dict[str, DatasetSpec], roles: dict[str, Role], classified: dict[str, Classified]
              ) -> dict[str, list[Sample]]:
    """The complete samples of every video dataset; orphan start frames reported on their datasets."""
    samples = {}
    for dataset_id, c in classified.items():
        if roles[dataset_id] != "conditioning":
            start_frames = [classified[cid] for cid in specs[dataset_id].conditioning_data if cid in classified]
            textfile = specs[dataset_id].caption_strategy == "textfile"
            samples[dataset_id] = pair(c, start_frames, captions=textfile).samples
    for dataset_id, c in classified.items():
        if roles[dataset_id] == "conditioning":
            report_orphan_start_frames(c, [classified[v] for v in samples if dataset_id in specs[v].conditioning_data])
    return samples


@dataclass
class DeepResult:
    kept: dict[str, list[Sample]]  # video dataset id -> the samples whose files pass
    reasons: dict[str, str]  # '<dataset>/<clip key>' -> the first finding of a sample that does not
    frame_buckets: dict[str, Counter[int]]  # video dataset id -> frame count -> kept clips that train at it


def deep_check(specs: dict[str, DatasetSpec], stores: dict[str, ObjectStore], samples: dict[str, list[Sample]],
               classified: dict[str, Classified], workers: int = DEEP_WORKERS) -> DeepResult:
    """Every sample through `check_sample`; every finding goes to its dataset's problems."""
    work = [(dataset_id, sample) for dataset_id, found in samples.items() for sample in found]
    progress = _Progress("preflight: samples checked", total=len(work))
    readers = {dataset_id: store.for_small_reads() for dataset_id, store in stores.items()}

    def check(item: tuple[str, Sample]) -> Checked:
        try:
            return check_sample(specs[item[0]], readers, item[1])
        finally:
            progress.add()

    result = DeepResult({dataset_id: [] for dataset_id in samples}, {},
                        {dataset_id: Counter() for dataset_id in samples})
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for (dataset_id, sample), checked in zip(work, pool.map(check, work)):
            findings = checked.findings
            for finding in findings:
                classified[dataset_id].problems.add(finding.kind, finding.example)
            if findings:
                result.reasons[f"{dataset_id}/{sample.clip.key}"] = f"{findings[0].kind.value}: {findings[0].example}"
            else:
                result.kept[dataset_id].append(sample)
                result.frame_buckets[dataset_id][checked.frame_bucket] += 1
    return result


def _pairing_reason(spec: DatasetSpec, clip: ObjectRecord, classified: dict[str, Classified]) -> str:
    """Why a clip made no sample: its first missing piece."""
    stem = posixpath.splitext(clip.key)[0]
    for cid in spec.conditioning_data:
        if cid in classified and stem not in classified[cid].media:
            return f"{ProblemKind.CLIP_WITHOUT_START_FRAME.value}: {clip.key} (none in '{cid}')"
    caption = classified[spec.id].captions.get(stem)
    if caption is None:
        return f"{ProblemKind.CLIP_WITHOUT_CAPTION.value}: {clip.key}"
    return f"{ProblemKind.EMPTY_CAPTION.value}: {caption.key}"


def _excluded(specs: dict[str, DatasetSpec], classified: dict[str, Classified], paired: dict[str, list[Sample]],
              kept: dict[str, list[Sample]], reasons: dict[str, str]) -> list[Excluded]:
    """Every clip of a video dataset that is not a usable sample, with the first reason."""
    excluded = []
    for dataset_id, samples in kept.items():
        complete = {s.clip.key for s in paired[dataset_id]}
        usable = {s.clip.key for s in samples}
        for clip in sorted(classified[dataset_id].media.values(), key=lambda r: r.key):
            if clip.key in usable:
                continue
            reason = (reasons[f"{dataset_id}/{clip.key}"] if clip.key in complete
                      else _pairing_reason(specs[dataset_id], clip, classified))
            excluded.append(Excluded(dataset_id, clip.key, reason))
    return excluded


def init_lora_problems(spec: JobSpec, credentials: CredentialsLookup) -> list[str]:
    """The rank and targets of the LoRA in spec.lora.initFrom against the spec, from its file's header."""
    store = store_for(spec.lora.init_from, credentials=credentials, what="spec.lora.initFrom")
    try:
        folder = read_lora_folder(store)
    except (InvalidConfigError, S3AccessError) as exc:
        return [str(exc)]
    return init_problems(spec.lora, folder)


def run_preflight(
    spec: JobSpec,
    *,
    credentials: CredentialsLookup = env_credentials,
    deep: bool = True,
    workers: int = LIST_WORKERS,
) -> PreflightResult:
    started = time.monotonic()
    used = datasets_in_use(spec)
    roles = {d.id: role for d, role in used}
    specs = {d.id: d for d, _ in used}
    stores = _stores(spec, used, credentials)
    reports = {d.id: DatasetReport(id=d.id, role=role, location=stores[d.id].url) for d, role in used}
    classified = {
        dataset_id: classify(
            Listing(dataset_id, stores[dataset_id].url, records),
            media_extensions=CLIP_EXTENSIONS if roles[dataset_id] != "conditioning" else IMAGE_EXTENSIONS,
            captions=roles[dataset_id] != "conditioning" and specs[dataset_id].caption_strategy == "textfile",
        )
        for dataset_id, records in _list_all(stores, reports, workers).items()
    }
    paired = _pair_all(specs, roles, classified)
    checked = deep_check(specs, stores, paired, classified) if deep else DeepResult(paired, {}, {})
    samples, reasons = checked.kept, checked.reasons
    for dataset_id, c in classified.items():
        report = reports[dataset_id]
        report.objects, report.media, report.captions = c.objects, len(c.media), len(c.captions)
        report.samples = len(samples.get(dataset_id, ()))
        report.frame_buckets = dict(checked.frame_buckets.get(dataset_id, {}))
        report.problems = _problem_reports(c.problems.all())
    clips = sum(len(classified[dataset_id].media) for dataset_id in samples)
    report = PreflightReport(
        datasets=[reports[d.id] for d, _ in used], deep=deep, seconds=round(time.monotonic() - started, 3),
        clips=clips, unusable=clips - sum(len(kept) for kept in samples.values()),
        max_bad_fraction=spec.training.max_bad_sample_fraction,
        spec_problems=model_file_problems(spec, credentials)
        + (init_lora_problems(spec, credentials) if spec.lora.init_from is not None else []),
    )
    log.info("preflight: %d datasets, %d clips, %d unusable, %.1fs, %s", len(used), clips, report.unusable,
             report.seconds, "ok" if report.ok else "problems found")
    return PreflightResult(report=report, samples=samples, stores=stores,
                           excluded=_excluded(specs, classified, paired, samples, reasons))
