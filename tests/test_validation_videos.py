"""Validation during training: videos, contact sheets and index.html in the real S3 bucket, model state restored."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from longcat_job.api import Location, LoraSpec
from longcat_job.parse import parse_job
from longcat_job.storage import store_for
from longcat_trainer import lora, train, validation_videos
from longcat_trainer.data.synthetic import write_shapes_dataset
from longcat_trainer.distributed import init_world
from longcat_trainer.model.loading import load_dit
from tests.fixtures.training import job_document, location

pytestmark = pytest.mark.s3


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.credentials.as_env().items():
        monkeypatch.setenv(key, value)


def _frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_validation_uploads_videos_sheets_and_index_under_the_step_prefix(
    tiny_checkpoint: Path, s3_server, s3_bucket: str, s3_env: None
) -> None:
    document = job_document(
        tiny_checkpoint, location("data/clips", s3=s3_server, bucket=s3_bucket),
        location("data/start_frames", s3=s3_server, bucket=s3_bucket), location("out", s3=s3_server, bucket=s3_bucket),
        validation={"resolution": "64x112", "frames": 9, "numInferenceSteps": 2, "guidance": 4.0, "maxSamples": 2},
    )
    job = parse_job(document)
    data = store_for(Location.model_validate(location("data", s3=s3_server, bucket=s3_bucket)), what="data")
    write_shapes_dataset(data, count=3, frames=9, height=64, width=112, fps=12)
    world = init_world()
    output = store_for(job.spec.output, what="output")
    train.frozen_manifest(job, output, world)

    dit = load_dit(tiny_checkpoint, dtype=torch.float32)
    lora.add_lora(dit, LoraSpec(rank=4))
    dit.train()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    validator = validation_videos.Validator()

    def info(step: int) -> train.StepInfo:
        return train.StepInfo(step, dit, world, job, tiny_checkpoint, output, None, {})

    uris = validator(info(3))
    assert uris == [f"s3://{s3_bucket}/out/validation/step-3/{i:02d}-shape-{i:03d}.mp4" for i in range(2)]
    validator(info(6))

    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/validation/")["Contents"]}
    for step in (3, 6):
        for i in range(2):
            assert {f"out/validation/step-{step}/{i:02d}-shape-{i:03d}.{ext}" for ext in ("mp4", "png")} <= keys
    video = client.get_object(Bucket=s3_bucket, Key="out/validation/step-6/01-shape-001.mp4")
    assert video["ContentType"] == "video/mp4"
    with av.open(io.BytesIO(video["Body"].read())) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 12  # the clip's own frame rate
        assert sum(1 for _ in container.decode(stream)) == 9
    # Fixed seeds: with the model unchanged between the steps, the videos are the same.
    # Decoded frames, not bytes: the MP4 header carries its creation time, and x264's threads may pick other
    # (equally good) encodings of the same frames.
    same = [_frames(client.get_object(Bucket=s3_bucket, Key=f"out/validation/step-{s}/00-shape-000.mp4")["Body"].read())
            for s in (3, 6)]
    assert len(same[0]) == 9
    # (x264 may pick another equally good encoding: a mean difference of a few levels in 255; a different
    # seed or model changes frames by tens.)
    assert max(np.abs(a.astype(np.int16) - b).mean() for a, b in zip(*same)) < 4.0
    page = client.get_object(Bucket=s3_bucket, Key="out/index.html")
    assert page["ContentType"].startswith("text/html")
    body = page["Body"].read().decode()
    # One row per sample: its start frame and source clip (copied beside the videos, so the page needs no
    # access to the dataset), then the video of each step, oldest first, with the control that plays them all.
    start, clip = "validation/inputs/00-shape-000-start.png", "validation/inputs/00-shape-000-clip.mp4"
    assert client.get_object(Bucket=s3_bucket, Key=f"out/{clip}")["ContentType"] == "video/mp4"
    original = client.get_object(Bucket=s3_bucket, Key="data/start_frames/shape-000.png")["Body"].read()
    assert client.get_object(Bucket=s3_bucket, Key=f"out/{start}")["Body"].read() == original
    row = body[body.index("<th>clips/shape-000"):]
    order = [row.index(f'src="{key}"') for key in (start, clip, "validation/step-3/00-shape-000.mp4",
                                                    "validation/step-6/00-shape-000.mp4")]
    assert order == sorted(order)
    assert 'src="validation/step-3/01-shape-001.mp4"' in body and "loss.png" in body
    assert "playAllInSync" in body and 'id="play-all"' in body

    # The model goes back to training with nothing left behind.
    assert dit.training and all(p.grad is None for p in dit.parameters())
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())
