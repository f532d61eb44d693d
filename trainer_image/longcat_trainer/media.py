"""Validation output files: H.264 MP4 (PyAV) and a contact-sheet PNG (Pillow), as bytes ready to upload."""

from __future__ import annotations

import io
import textwrap
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CRF = "18"  # visually near-lossless: validation videos are for judging detail
SHEET_EVERY = 8  # one thumbnail per 8 frames (frame 0, 8, 16, ...)
SHEET_COLUMNS = 6
THUMB_WIDTH = 208  # a 480x832 frame becomes 208x120
CAPTION_LINES = 3  # the step, then up to two lines of prompt
LINE_HEIGHT = 14
CAPTION_PAD = 6
BACKGROUND = (24, 24, 24)


def even_crop(frames: np.ndarray) -> np.ndarray:
    """yuv420p halves the chroma planes: H.264 needs even sides, so an odd last row or column is dropped."""
    height, width = frames.shape[1:3]
    return frames[:, : height - height % 2, : width - width % 2]


def mp4_bytes(frames: torch.Tensor | np.ndarray, fps: float) -> bytes:
    """uint8 [F, H, W, 3] RGB -> an H.264 (yuv420p) MP4 at `fps` frames per second."""
    pixels = even_crop(np.asarray(frames, dtype=np.uint8))
    if pixels.shape[1] < 2 or pixels.shape[2] < 2:
        raise ValueError(f"frames of {pixels.shape[2]}x{pixels.shape[1]} are too small for H.264")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = pixels.shape[2], pixels.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": CRF}
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def sheet_layout(num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(columns, rows, thumbnail width, thumbnail height) of a contact sheet."""
    thumbs = len(range(0, num_frames, SHEET_EVERY))
    thumb_w = min(width, THUMB_WIDTH)
    thumb_h = max(1, round(height * thumb_w / width))
    columns = min(thumbs, SHEET_COLUMNS)
    return columns, -(-thumbs // columns), thumb_w, thumb_h


def sheet_size(num_frames: int, height: int, width: int) -> tuple[int, int]:
    """Pixel (width, height) of the sheet of a [num_frames, height, width] video: thumbnails plus the caption band."""
    columns, rows, thumb_w, thumb_h = sheet_layout(num_frames, height, width)
    return columns * thumb_w, rows * thumb_h + CAPTION_LINES * LINE_HEIGHT + 2 * CAPTION_PAD


def contact_sheet_png(frames: torch.Tensor | np.ndarray, *, caption: str, step: int | None) -> bytes:
    """A grid of every SHEET_EVERY-th frame of uint8 [F, H, W, 3], under a caption band (step and prompt)."""
    pixels = np.asarray(frames, dtype=np.uint8)
    num_frames, height, width = pixels.shape[:3]
    columns, _, thumb_w, thumb_h = sheet_layout(num_frames, height, width)
    sheet = Image.new("RGB", sheet_size(num_frames, height, width), BACKGROUND)
    band = CAPTION_LINES * LINE_HEIGHT + 2 * CAPTION_PAD
    for i, index in enumerate(range(0, num_frames, SHEET_EVERY)):
        thumb = Image.fromarray(pixels[index]).resize((thumb_w, thumb_h), Image.Resampling.LANCZOS)
        sheet.paste(thumb, ((i % columns) * thumb_w, band + (i // columns) * thumb_h))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    title = f"step {step}" if step is not None else "preview"
    lines = [f"{title} - frames 0..{num_frames - 1} every {SHEET_EVERY}"]
    chars = max(8, sheet.width // 6)  # the default bitmap font is about 6 pixels a character
    lines += textwrap.wrap(caption, width=chars, max_lines=CAPTION_LINES - 1, placeholder=" ...")
    for n, line in enumerate(lines):
        draw.text((CAPTION_PAD, CAPTION_PAD + n * LINE_HEIGHT), line, fill="white", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
