"""The deep part of preflight: each sample's files read just far enough to know the trainer can use them.

    clip         ranged reads of the container header and the first frame: it opens, has a video stream, its
                 first frame decodes, it fills the dataset's smallest frame bucket (the header's count, or
                 duration x rate where the container keeps none; the largest bucket it fills is the one it trains
                 at), and its shorter side reaches the dataset's `resolution`
    start frame  a ranged read of its header: an image of its clip's pixel size
    caption      valid UTF-8, not blank, at most MAX_CAPTION_CHARS

Objects are opened with the size the listing gave, so a small clip, a start frame and a caption cost one GET
each. PyAV and Pillow are imported here only. The trainer still guards against what only decoding a whole clip
reveals (a corrupt frame further in).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from .api import DatasetSpec
from .buckets import frame_bucket
from .pairing import ProblemKind, Sample
from .storage import ObjectRecord, ObjectStore

log = logging.getLogger(__name__)

# UMT5 reads 512 tokens, about 2,000 characters of English; far longer text is likely not a caption at all.
MAX_CAPTION_CHARS = 4000
CLIP_BLOCK = 256 * 1024  # one GET covers a small clip, or the header and first frame of a large faststart one
IMAGE_BLOCK = 64 * 1024  # image headers sit in the first few KB


@dataclass(frozen=True)
class Finding:
    kind: ProblemKind
    example: str  # "<key> (<what was found>)": what the report lists


@dataclass(frozen=True)
class Checked:
    findings: list[Finding]
    frame_bucket: int | None  # the frame count the clip trains at; None when it cannot be read or is too short


@dataclass(frozen=True)
class ClipHeader:
    frames: int
    width: int
    height: int


class Unreadable(Exception):
    """A file that its library cannot open or decode; the message says what failed."""


def read_clip_header(store: ObjectStore, record: ObjectRecord) -> ClipHeader:
    """Frame count and size from the container header, and the first frame decoded (ranged reads only)."""
    import av  # noqa: PLC0415 - only the deep check needs PyAV

    if record.size == 0:
        raise Unreadable("0 bytes")
    try:
        with store.open_ranged(record.key, size=record.size, block=CLIP_BLOCK) as raw, \
                av.open(raw, mode="r") as container:
            if not container.streams.video:
                raise Unreadable("no video stream")
            stream = container.streams.video[0]
            # One thread: decoding one frame, a codec's worker threads cost more than they save.
            stream.codec_context.thread_count = 1
            frames = stream.frames
            if not frames and stream.duration is not None and stream.average_rate:
                frames = int(round(float(stream.duration * stream.time_base * stream.average_rate)))
            next(container.decode(stream))  # the first frame: the codec and its data are usable
            return ClipHeader(frames=int(frames or 0), width=stream.codec_context.width,
                              height=stream.codec_context.height)
    except (av.FFmpegError, StopIteration, IndexError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise Unreadable(type(exc).__name__) from None


def read_image_size(store: ObjectStore, record: ObjectRecord) -> tuple[int, int]:
    """(width, height) from an image's header (a ranged read of its first block)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only the deep check needs Pillow

    if record.size == 0:
        raise Unreadable("0 bytes")
    try:
        with store.open_ranged(record.key, size=record.size, block=IMAGE_BLOCK) as raw, \
                Image.open(raw) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise Unreadable(type(exc).__name__) from None


def caption_finding(key: str, data: bytes) -> Finding | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Finding(ProblemKind.CAPTION_NOT_UTF8, f"{key} (byte {exc.start} is not UTF-8)")
    if not text.strip():
        return Finding(ProblemKind.EMPTY_CAPTION, key)
    if len(text) > MAX_CAPTION_CHARS:
        return Finding(ProblemKind.CAPTION_TOO_LONG, f"{key} ({len(text)} characters > {MAX_CAPTION_CHARS})")
    return None


def check_sample(spec: DatasetSpec, stores: Mapping[str, ObjectStore], sample: Sample) -> Checked:
    """Everything wrong with one sample of video dataset `spec` (stores: dataset id -> its store), and the frame
    bucket its clip trains at."""
    store = stores[spec.id]
    found: list[Finding] = []
    clip_key = sample.clip.key
    bucket = None
    try:
        header: ClipHeader | None = read_clip_header(store, sample.clip)
    except Unreadable as exc:
        header = None
        found.append(Finding(ProblemKind.CLIP_UNREADABLE, f"{clip_key} ({exc})"))
    if header is not None:
        counts = spec.frame_counts()
        bucket = frame_bucket(header.frames, counts)
        if bucket is None:
            found.append(Finding(ProblemKind.CLIP_TOO_SHORT, f"{clip_key} ({header.frames} < {counts[0]} frames)"))
        if min(header.width, header.height) < spec.resolution:
            found.append(Finding(ProblemKind.CLIP_TOO_SMALL,
                                 f"{clip_key} ({header.width}x{header.height} < {spec.resolution})"))
    for dataset_id, frame in sample.start_frames.items():
        name = f"{dataset_id}/{frame.key}"
        try:
            width, height = read_image_size(stores[dataset_id], frame)
        except Unreadable as exc:
            found.append(Finding(ProblemKind.START_FRAME_UNREADABLE, f"{name} ({exc})"))
            continue
        if header is not None and (width, height) != (header.width, header.height):
            found.append(Finding(ProblemKind.START_FRAME_SIZE_MISMATCH,
                                 f"{name} ({width}x{height}, its clip {clip_key} is {header.width}x{header.height})"))
    if sample.caption is not None:
        finding = caption_finding(sample.caption.key, store.get_bytes(sample.caption.key))
        if finding is not None:
            found.append(finding)
    return Checked(found, bucket)
