"""Clips paired with start frames and captions by file stem: a pure function of object listings.

A stem is a key relative to its dataset's root without its extension (`scenes/a.mp4` -> `scenes/a`), so
subfolders must match between a clip dataset and its start-frame datasets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from posixpath import splitext

from .storage import ObjectRecord

CLIP_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".mkv"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CAPTION_EXTENSION = ".txt"
# The report keeps this many keys of each kind of problem; counts stay exact.
MAX_EXAMPLES = 20


class ProblemKind(StrEnum):
    EMPTY_PREFIX = "EmptyPrefix"
    CLIP_WITHOUT_START_FRAME = "ClipWithoutStartFrame"
    START_FRAME_WITHOUT_CLIP = "StartFrameWithoutClip"
    CLIP_WITHOUT_CAPTION = "ClipWithoutCaption"
    EMPTY_CAPTION = "EmptyCaption"
    CAPTION_WITHOUT_CLIP = "CaptionWithoutClip"
    DUPLICATE_STEM = "DuplicateStem"
    UNKNOWN_TYPE = "UnknownType"
    # Found only by the deep check (sample_check.py), which reads each sample's files just far enough.
    CLIP_TOO_SHORT = "ClipTooShort"
    CLIP_TOO_SMALL = "ClipTooSmall"
    CLIP_UNREADABLE = "ClipUnreadable"
    START_FRAME_UNREADABLE = "StartFrameUnreadable"
    START_FRAME_SIZE_MISMATCH = "StartFrameSizeMismatch"
    CAPTION_NOT_UTF8 = "CaptionNotUtf8"
    CAPTION_TOO_LONG = "CaptionTooLong"


# Kinds that make one sample unusable. The job tolerates them up to spec.training.maxBadSampleFraction, leaving
# those samples out of the manifest; the other errors (EmptyPrefix, DuplicateStem) stop it.
SAMPLE_KINDS = frozenset({
    ProblemKind.CLIP_WITHOUT_START_FRAME, ProblemKind.CLIP_WITHOUT_CAPTION, ProblemKind.EMPTY_CAPTION,
    ProblemKind.CLIP_TOO_SHORT, ProblemKind.CLIP_TOO_SMALL, ProblemKind.CLIP_UNREADABLE,
    ProblemKind.START_FRAME_UNREADABLE, ProblemKind.START_FRAME_SIZE_MISMATCH, ProblemKind.CAPTION_NOT_UTF8,
    ProblemKind.CAPTION_TOO_LONG,
})


# Warnings are reported but do not stop a job: nothing is trained on the object concerned.
WARNINGS = frozenset({ProblemKind.START_FRAME_WITHOUT_CLIP, ProblemKind.CAPTION_WITHOUT_CLIP, ProblemKind.UNKNOWN_TYPE})

HINTS: dict[ProblemKind, str] = {
    ProblemKind.EMPTY_PREFIX: "no objects under this source: check the bucket, prefix or path",
    ProblemKind.CLIP_WITHOUT_START_FRAME: "upload a start frame with the clip's stem (png, jpg, jpeg or webp) "
    "or remove the clip",
    ProblemKind.START_FRAME_WITHOUT_CLIP: "this start frame has no clip of the same stem and is ignored",
    ProblemKind.CLIP_WITHOUT_CAPTION: "add <stem>.txt beside the clip or remove the clip",
    ProblemKind.EMPTY_CAPTION: "write the caption into the .txt file or remove the clip",
    ProblemKind.CAPTION_WITHOUT_CLIP: "this caption has no clip of the same stem and is ignored",
    ProblemKind.DUPLICATE_STEM: "keep one file per stem: these differ only by extension",
    ProblemKind.UNKNOWN_TYPE: "not a clip (mp4, mov, webm, mkv), start frame (png, jpg, jpeg, webp) or caption "
    "(.txt) of this dataset, ignored",
    ProblemKind.CLIP_TOO_SHORT: "the clip has fewer frames than the dataset's smallest frame bucket (`frameBuckets`, "
    "or `frames`): add a smaller bucket, lower `frames`, or drop it",
    ProblemKind.CLIP_TOO_SMALL: "the clip's shorter side is below the dataset's `resolution`: drop it or lower "
    "`resolution`",
    ProblemKind.CLIP_UNREADABLE: "PyAV cannot open or decode this clip: re-encode it (e.g. H.264 in MP4)",
    ProblemKind.START_FRAME_UNREADABLE: "not a readable image: save the start frame as PNG or JPEG",
    ProblemKind.START_FRAME_SIZE_MISMATCH: "the start frame must have its clip's pixel size: export it from the "
    "clip's first frame",
    ProblemKind.CAPTION_NOT_UTF8: "the caption is not UTF-8 text: save the .txt file as UTF-8",
    ProblemKind.CAPTION_TOO_LONG: "the text encoder reads at most 512 tokens (about 2,000 characters); shorten "
    "the caption",
}


@dataclass
class ProblemList:
    """Exact count, first keys. `related` names the other dataset involved (e.g. the start frames')."""

    kind: ProblemKind
    related: str | None = None
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, key: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(key)

    @property
    def is_error(self) -> bool:
        return self.kind not in WARNINGS


class Problems:
    """Problems of one dataset, grouped by kind and related dataset, in order of first occurrence."""

    def __init__(self) -> None:
        self._lists: dict[tuple[ProblemKind, str | None], ProblemList] = {}

    def add(self, kind: ProblemKind, key: str, related: str | None = None) -> None:
        entry = self._lists.get((kind, related))
        if entry is None:
            entry = self._lists[(kind, related)] = ProblemList(kind, related)
        entry.add(key)

    def all(self) -> list[ProblemList]:
        return list(self._lists.values())


@dataclass(frozen=True)
class Listing:
    dataset_id: str
    url: str
    records: Sequence[ObjectRecord]


@dataclass
class Classified:
    """One dataset's objects sorted by role; `media` holds clips (video) or start frames (conditioning)."""

    dataset_id: str
    objects: int
    media: dict[str, ObjectRecord]
    captions: dict[str, ObjectRecord]
    problems: Problems


@dataclass(frozen=True)
class Sample:
    stem: str
    clip: ObjectRecord
    caption: ObjectRecord | None
    start_frames: Mapping[str, ObjectRecord]  # conditioning dataset id -> its start frame


@dataclass
class Paired:
    classified: Classified
    samples: list[Sample]


def classify(listing: Listing, *, media_extensions: frozenset[str], captions: bool) -> Classified:
    problems = Problems()
    if not listing.records:
        problems.add(ProblemKind.EMPTY_PREFIX, listing.url)
    by_stem: dict[str, list[ObjectRecord]] = {}
    caption_by_stem: dict[str, ObjectRecord] = {}
    for record in sorted(listing.records, key=lambda r: r.key):
        stem, ext = splitext(record.key)
        ext = ext.lower()
        if ext in media_extensions:
            by_stem.setdefault(stem, []).append(record)
        elif captions and ext == CAPTION_EXTENSION:
            caption_by_stem[stem] = record
        else:
            problems.add(ProblemKind.UNKNOWN_TYPE, record.key)
    media: dict[str, ObjectRecord] = {}
    for stem, records in by_stem.items():
        if len(records) > 1:
            for record in records:
                problems.add(ProblemKind.DUPLICATE_STEM, record.key)
        media[stem] = records[0]
    return Classified(listing.dataset_id, len(listing.records), media, caption_by_stem, problems)


def pair(clips: Classified, start_frames: Sequence[Classified], *, captions: bool) -> Paired:
    """Samples of a clip dataset; a clip lacking a start frame or a (non-empty) caption makes no sample."""
    samples: list[Sample] = []
    for stem, clip in sorted(clips.media.items()):
        complete = True
        frames: dict[str, ObjectRecord] = {}
        for conditioning in start_frames:
            frame = conditioning.media.get(stem)
            if frame is None:
                clips.problems.add(ProblemKind.CLIP_WITHOUT_START_FRAME, clip.key, conditioning.dataset_id)
                complete = False
            else:
                frames[conditioning.dataset_id] = frame
        caption = clips.captions.get(stem) if captions else None
        if captions and caption is None:
            clips.problems.add(ProblemKind.CLIP_WITHOUT_CAPTION, clip.key)
            complete = False
        elif caption is not None and caption.size == 0:
            clips.problems.add(ProblemKind.EMPTY_CAPTION, caption.key)
            complete = False
        if complete:
            samples.append(Sample(stem, clip, caption, frames))
    for stem, caption in sorted(clips.captions.items()):
        if stem not in clips.media:
            clips.problems.add(ProblemKind.CAPTION_WITHOUT_CLIP, caption.key)
    return Paired(clips, samples)


def report_orphan_start_frames(conditioning: Classified, clip_datasets: Iterable[Classified]) -> None:
    """Start frames no clip dataset using this conditioning dataset has a clip for."""
    users = list(clip_datasets)
    for stem, frame in sorted(conditioning.media.items()):
        if not any(stem in clips.media for clips in users):
            users_ids = ",".join(c.dataset_id for c in users) or None
            conditioning.problems.add(ProblemKind.START_FRAME_WITHOUT_CLIP, frame.key, users_ids)
