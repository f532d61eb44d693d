"""Clip decoding, temporal sampling, aspect buckets and start frames, on real MP4 and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_job.buckets import Bucket, bucket_for, buckets, target_pixels
from longcat_trainer.data.synthetic import ShapeClip, encode_mp4, encode_png, render
from longcat_trainer.data.video import BadSampleError, ClipTooShortError, decode_clip, prepare_sample

CLIP = ShapeClip("a", "red", "blue", "right", square=True)


def write_clip(path: Path, frames: int, height: int = 64, width: int = 112) -> np.ndarray:
    video = render(CLIP, frames, height, width)
    path.write_bytes(encode_mp4(video, fps=16))
    return video


def test_480p_buckets_on_the_64_grid() -> None:
    found = buckets(480, 64)
    for b in found:
        assert b.height % 64 == 0 and b.width % 64 == 0
        assert abs(b.height * b.width - target_pixels(480)) <= 0.1 * target_pixels(480)
    for landscape in (Bucket(448, 832), Bucket(512, 832)):
        assert landscape in found
        assert Bucket(landscape.width, landscape.height) in found  # the portrait twin
    assert Bucket(480, 832) not in found  # 480 is not a multiple of 64
    assert bucket_for(480, 832, 480, 64) == Bucket(512, 832)
    assert bucket_for(832, 480, 480, 64) == Bucket(832, 512)
    assert bucket_for(1080, 1920, 480, 64) == Bucket(448, 832)
    assert bucket_for(480, 832, 480, 16) == Bucket(480, 832)  # on the 16 grid the native shape is a bucket


def test_decode_takes_the_first_frames_and_skips_short_clips(tmp_path: Path) -> None:
    video = write_clip(tmp_path / "a.mp4", frames=13)
    frames = decode_clip(tmp_path / "a.mp4", [9], "clips/a.mp4")
    assert frames.shape == (9, 3, 64, 112) and frames.dtype == torch.uint8
    # H.264 is lossy: each decoded frame is close to the rendered frame of the same index, not another one.
    decoded = frames.permute(0, 2, 3, 1).float()
    errors = [(decoded[i] - torch.from_numpy(video[j]).float()).abs().mean().item() for i in (0, 8) for j in (0, 8)]
    assert errors[0] < 6 and errors[3] < 6 and errors[1] > 10 and errors[2] > 10
    with pytest.raises(ClipTooShortError, match=r"clips/a.mp4: 13 frames, the dataset needs at least 17"):
        decode_clip(tmp_path / "a.mp4", [17, 21], "clips/a.mp4")


def test_decode_takes_the_largest_frame_bucket_the_clip_fills(tmp_path: Path) -> None:
    write_clip(tmp_path / "a.mp4", frames=15)
    assert decode_clip(tmp_path / "a.mp4", [5, 13, 17], "clips/a.mp4").shape[0] == 13
    assert decode_clip(tmp_path / "a.mp4", [5, 9], "clips/a.mp4").shape[0] == 9
    single = decode_clip(tmp_path / "a.mp4", [9], "clips/a.mp4")
    assert torch.equal(decode_clip(tmp_path / "a.mp4", [5, 13, 17], "clips/a.mp4")[:9], single)  # from frame 0


def test_corrupt_clip_is_named(tmp_path: Path) -> None:
    good = (write_clip(tmp_path / "a.mp4", frames=9), (tmp_path / "a.mp4").read_bytes())[1]
    (tmp_path / "bad.mp4").write_bytes(good[:200] + b"\0" * 500)
    with pytest.raises(BadSampleError, match=r"clips/bad.mp4: .*re-encode"):
        decode_clip(tmp_path / "bad.mp4", [9], "clips/bad.mp4")


def test_prepare_sample_brings_clip_and_start_frame_to_the_bucket(tmp_path: Path) -> None:
    video = write_clip(tmp_path / "a.mp4", frames=9, height=64, width=96)
    (tmp_path / "a.png").write_bytes(encode_png(video[0]))
    sample = prepare_sample(tmp_path / "a.mp4", tmp_path / "a.png", frame_counts=[9], resolution=64, alignment=16,
                            clip_name="a.mp4", frame_name="a.png")
    assert sample.bucket == Bucket(64, 112)
    assert sample.video.shape == (3, 9, 64, 112) and sample.start_frame.shape == (3, 1, 64, 112)
    assert sample.video.min() >= -1 and sample.video.max() <= 1
    # Same resize and crop: the start frame matches the clip's first frame up to compression.
    assert (sample.video[:, :1] - sample.start_frame).abs().mean() < 0.05


def test_start_frame_of_another_size_is_refused(tmp_path: Path) -> None:
    video = write_clip(tmp_path / "a.mp4", frames=9)
    Image.fromarray(video[0]).resize((56, 32)).save(tmp_path / "a.png")
    with pytest.raises(BadSampleError, match=r"frames/a.png: start frame is 56x32 but its clip clips/a.mp4 is 112x64"):
        prepare_sample(tmp_path / "a.mp4", tmp_path / "a.png", frame_counts=[9], resolution=64, alignment=16,
                       clip_name="clips/a.mp4", frame_name="frames/a.png")
