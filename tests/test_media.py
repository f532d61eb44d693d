"""MP4 and contact-sheet files of validation, decoded back with PyAV and Pillow."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from longcat_trainer import media


def gradient_frames(count: int, height: int, width: int) -> np.ndarray:
    """Frames whose brightness rises with the frame index, so order and content are checkable."""
    base = np.linspace(0, 1, width, dtype=np.float32)[None, None, :, None]
    frames = np.stack([(base * 100 + 8 * i) for i in range(count)])[:, 0]
    return np.broadcast_to(frames, (count, height, width, 3)).clip(0, 255).astype(np.uint8).copy()


@pytest.mark.parametrize(("height", "width", "fps"), [(64, 112, 16), (33, 47, 24)])
def test_mp4_decodes_to_the_frames_size_and_rate(height: int, width: int, fps: int) -> None:
    frames = gradient_frames(17, height, width)
    data = media.mp4_bytes(frames, fps)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == Fraction(fps)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        pix_fmt = stream.codec_context.pix_fmt
    assert pix_fmt == "yuv420p"
    assert len(decoded) == 17
    assert decoded[0].shape == (height - height % 2, width - width % 2, 3)  # odd sides cropped to even
    means = [float(f.mean()) for f in decoded]
    assert means == sorted(means) and means[-1] - means[0] > 100  # frames kept in order
    assert abs(means[3] - frames[3, : height - height % 2, : width - width % 2].mean()) < 3


def test_mp4_refuses_frames_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        media.mp4_bytes(np.zeros((3, 1, 8, 3), dtype=np.uint8), 16)


def test_contact_sheet_has_every_eighth_frame_and_a_caption_band() -> None:
    frames = gradient_frames(93, 480, 832)  # 12 thumbnails: frames 0, 8, ..., 88
    png = media.contact_sheet_png(frames, caption="a red car drives down the street " * 10, step=250)
    sheet = Image.open(io.BytesIO(png))
    band = media.CAPTION_LINES * media.LINE_HEIGHT + 2 * media.CAPTION_PAD
    assert sheet.size == (6 * 208, band + 2 * 120) == media.sheet_size(93, 480, 832)
    pixels = np.asarray(sheet.convert("RGB")).astype(int)
    # Thumbnail k shows frame 8k: its mean brightness follows the frame's.
    for k in (0, 5, 11):
        top, left = band + (k // 6) * 120, (k % 6) * 208
        assert abs(pixels[top : top + 120, left : left + 208].mean() - frames[8 * k].mean()) < 3
    assert (pixels[: band, :, :] != media.BACKGROUND).any()  # the caption was drawn


def test_small_video_sheet_keeps_its_size() -> None:
    sheet = Image.open(io.BytesIO(media.contact_sheet_png(gradient_frames(9, 64, 112), caption="", step=None)))
    band = media.CAPTION_LINES * media.LINE_HEIGHT + 2 * media.CAPTION_PAD
    assert sheet.size == (2 * 112, band + 64)  # frames 0 and 8, not enlarged
