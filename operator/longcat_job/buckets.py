"""Aspect buckets: the frame sizes a dataset trains at, shared by preflight (which checks clips against them)
and the trainer (which resizes clips into them). Pure arithmetic, no media libraries.

Every clip is resized (keeping its aspect, covering the bucket) and center-cropped to a
bucket whose sides are multiples of `aspectBucketAlignment` (always a multiple of 16, as the VAE's 8x and
the DiT's 2x2 patches need), with a pixel count near the target of the dataset's `resolution`:

    target pixels = resolution^2 * 832/480      (the model's native 480x832 frame, scaled to the short side)
    buckets       = every (height, width) on the alignment grid with aspect between 1:4 and 4:1 whose pixel
                    count is within 10% of the target (for each height, the widths just below and above
                    target/height)
    a clip's bucket = the one closest to the clip's aspect ratio (in log ratio), ties to the nearer pixel count

For resolution 480 and alignment 64 the target is 399,360 pixels and the buckets near LongCat's native
shape are 448x832 (372,736 px), 512x832 (425,984), 448x896 and 512x768; 480x832 itself is not on the
64 grid (480 = 7.5 x 64), and a 480x832 clip lands in 512x832 (aspect 1.625 vs 1.733; 448x832 is 1.857).
Portrait clips get the twins (832x448, 832x512, ...). With alignment 16, 480x832 is itself a bucket.

Frame buckets (a dataset's `frameBuckets`, or its `frames` alone): a clip trains at the largest count it can
fill, taken from its frame 0 (the start frame is the clip's first picture); a clip shorter than the smallest
count is skipped. A batch holds one (size, frames) bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from .failures import InvalidConfigError

NATIVE_ASPECT = 832 / 480
AREA_TOLERANCE = 0.10
MAX_ASPECT = 4.0


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        height, width = text.split("x")
        return cls(int(height), int(width))


def target_pixels(resolution: int) -> float:
    return resolution * resolution * NATIVE_ASPECT


@lru_cache(maxsize=64)
def buckets(resolution: int, alignment: int) -> tuple[Bucket, ...]:
    """The bucket list of a dataset (see the module docstring), sorted by height."""
    target = target_pixels(resolution)
    found: set[Bucket] = set()
    max_side = int(math.sqrt(target * MAX_ASPECT)) + alignment
    for height in range(alignment, max_side + 1, alignment):
        below = max(alignment, int(target / height) // alignment * alignment)
        for width in (below, below + alignment):
            aspect = width / height
            close = abs(width * height - target) <= AREA_TOLERANCE * target
            if close and 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
                found.add(Bucket(height, width))
    if not found:
        raise InvalidConfigError(f"no bucket near {resolution}p on a {alignment}-pixel grid: lower aspectBucketAlignment")
    return tuple(sorted(found))


def bucket_for(height: int, width: int, resolution: int, alignment: int) -> Bucket:
    aspect = math.log(width / height)
    target = target_pixels(resolution)
    return min(
        buckets(resolution, alignment),
        key=lambda b: (round(abs(math.log(b.width / b.height) - aspect), 9), abs(b.height * b.width - target)),
    )


def frame_bucket(available: int, counts: Sequence[int]) -> int | None:
    """The largest frame count of `counts` that a clip of `available` frames fills; None when it fills none."""
    return max((n for n in counts if n <= available), default=None)
