"""Clips and start frames as tensors: PyAV decode, temporal sampling, aspect buckets, resize and center crop.

Temporal sampling: a training clip is its first N consecutive decoded frames, at the clip's own frame rate
(no resampling), where N is the largest of the dataset's frame buckets the clip fills. The start frame of an
image-to-video pair is the picture the clip starts from, so the clip is taken from its frame 0. A clip shorter
than the smallest bucket is skipped (`ClipTooShort`), never padded.

Aspect buckets (longcat_job/buckets.py): every clip is resized (keeping its aspect, covering the bucket) and
center-cropped to its bucket. The start frame is loaded the same way into its clip's bucket; it must have the
clip's pixel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from longcat_job.buckets import Bucket, bucket_for, frame_bucket
from longcat_job.failures import BadInputError


class BadSampleError(BadInputError):
    """One sample cannot be used; the message names the file and what to do. The sample is skipped."""


class ClipTooShortError(BadSampleError):
    pass


def resize_crop(frames: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """[F, 3, H, W] uint8 -> [F, 3, h, w] float in [-1, 1]: scale to cover the bucket, then center-crop."""
    height, width = frames.shape[-2:]
    scale = max(bucket.height / height, bucket.width / width)
    size = (max(bucket.height, round(height * scale)), max(bucket.width, round(width * scale)))
    x = frames.float() / 127.5 - 1
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - bucket.height) // 2, (size[1] - bucket.width) // 2
    return x[:, :, top : top + bucket.height, left : left + bucket.width].clamp(-1, 1)


def decode_clip(path: Path, frame_counts: Sequence[int], name: str) -> torch.Tensor:
    """The first N frames of a clip as uint8 [N, 3, H, W], N the largest of `frame_counts` it fills; `name` is
    used in errors."""
    frames = max(frame_counts)
    decoded: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSampleError(f"{name}: has no video stream; re-encode it (e.g. H.264 in MP4)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                decoded.append(frame.to_ndarray(format="rgb24"))
                if len(decoded) == frames:
                    break
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise BadSampleError(f"{name}: PyAV cannot decode it ({type(exc).__name__}); re-encode it (e.g. H.264 in MP4)")
    count = frame_bucket(len(decoded), frame_counts)
    if count is None:
        raise ClipTooShortError(f"{name}: {len(decoded)} frames, the dataset needs at least {min(frame_counts)}; add "
                                "a smaller frame bucket (frameBuckets), lower `frames`, or drop it")
    return torch.from_numpy(np.stack(decoded[:count])).permute(0, 3, 1, 2).contiguous()


def load_image(path: Path, name: str) -> torch.Tensor:
    """uint8 [1, 3, H, W] of a start frame."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise BadSampleError(f"{name}: not a readable image ({type(exc).__name__}); save it as PNG or JPEG")
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]


@dataclass
class PreparedSample:
    video: torch.Tensor  # [3, F, h, w] in [-1, 1]
    start_frame: torch.Tensor  # [3, 1, h, w] in [-1, 1]
    bucket: Bucket


def prepare_sample(
    clip: Path, start_frame: Path, *, frame_counts: Sequence[int], resolution: int, alignment: int, clip_name: str,
    frame_name: str,
) -> PreparedSample:
    """Clip and start frame, decoded, checked against each other and brought to the clip's bucket."""
    video = decode_clip(clip, frame_counts, clip_name)
    image = load_image(start_frame, frame_name)
    if image.shape[-2:] != video.shape[-2:]:
        (ih, iw), (vh, vw) = image.shape[-2:], video.shape[-2:]
        raise BadSampleError(
            f"{frame_name}: start frame is {iw}x{ih} but its clip {clip_name} is {vw}x{vh}; export the start frame "
            "from the clip's first frame at the clip's size"
        )
    bucket = bucket_for(video.shape[-2], video.shape[-1], resolution, alignment)
    return PreparedSample(
        video=resize_crop(video, bucket).permute(1, 0, 2, 3),
        start_frame=resize_crop(image, bucket).permute(1, 0, 2, 3),
        bucket=bucket,
    )
