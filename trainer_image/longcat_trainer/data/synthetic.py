"""A small paired image-to-video dataset of moving shapes, for tests and the demo.

Layout written into an ObjectStore (an S3 prefix or a local directory), as a user would upload it:

    clips/<stem>.mp4          H.264 yuv420p, `frames` frames at `fps`
    clips/<stem>.txt          its caption ("a red square moves right on a blue background")
    start_frames/<stem>.png   the clip's first frame, as rendered (lossless)

A job then declares a `video` dataset on `clips/` (captionStrategy textfile, conditioningData
[start_frames]) and a `conditioning` dataset on `start_frames/`.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from longcat_job.storage import ObjectStore

CLIPS_PREFIX = "clips/"
START_FRAMES_PREFIX = "start_frames/"

_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
_DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


@dataclass(frozen=True)
class ShapeClip:
    stem: str
    colour: str
    background: str
    direction: str
    square: bool

    @property
    def caption(self) -> str:
        shape = "square" if self.square else "disc"
        return f"a {self.colour} {shape} moves {self.direction} on a {self.background} background"


def render(clip: ShapeClip, frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3]: a shape crossing the frame at constant speed."""
    ys, xs = np.mgrid[0:height, 0:width]
    radius = max(2, min(height, width) // 5)
    dx, dy = _DIRECTIONS[clip.direction]
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = _COLOURS[clip.background]
    for i in range(frames):
        progress = i / max(1, frames - 1) - 0.5  # -0.5 .. 0.5 across the clip
        cx = width / 2 + dx * progress * (width - 2 * radius)
        cy = height / 2 + dy * progress * (height - 2 * radius)
        if clip.square:
            inside = (abs(xs - cx) <= radius) & (abs(ys - cy) <= radius)
        else:
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        video[i][inside] = _COLOURS[clip.colour]
    return video


def encode_mp4(video: np.ndarray, fps: int) -> bytes:
    """H.264 yuv420p MP4 bytes of uint8 [F, H, W, 3] (H and W even)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for picture in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def encode_png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def shape_clips(count: int, *, seed: int = 0) -> list[ShapeClip]:
    rng = random.Random(seed)
    clips = []
    for i in range(count):
        colour, background = rng.sample(sorted(_COLOURS), 2)
        direction = rng.choice(sorted(_DIRECTIONS))
        clips.append(ShapeClip(f"shape-{i:03d}", colour, background, direction, square=rng.random() < 0.5))
    return clips


def write_shapes_dataset(
    store: ObjectStore,
    *,
    count: int = 4,
    frames: int = 9,
    height: int = 64,
    width: int = 112,
    fps: int = 16,
    seed: int = 0,
) -> list[ShapeClip]:
    """Write `count` clips with captions and start frames (layout in the module docstring)."""
    clips = shape_clips(count, seed=seed)
    for clip in clips:
        video = render(clip, frames, height, width)
        store.put_bytes(f"{CLIPS_PREFIX}{clip.stem}.mp4", encode_mp4(video, fps))
        store.put_bytes(f"{CLIPS_PREFIX}{clip.stem}.txt", clip.caption.encode())
        store.put_bytes(f"{START_FRAMES_PREFIX}{clip.stem}.png", encode_png(video[0]))
    return clips
