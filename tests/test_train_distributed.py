"""Two processes under torchrun (gloo) train from an S3 dataset to a LoRA in S3, with DDP and with FSDP.

The FSDP job runs on the caches the DDP job filled: it must find every entry, encode nothing, and end
with the same LoRA (the two ways of spreading the model compute the same steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from longcat_job.progress import TrainerProgress
from longcat_job.storage import S3Store
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.cluster import free_port
from tests.fixtures.training import job_document, location, with_vae_cache

pytestmark = [pytest.mark.slow, pytest.mark.s3]
TIME_LIMIT_S = 180
CLIPS = 4


def torchrun(s3, bucket: str, model: Path, out: str, tmp_path: Path, **training) -> float:
    """Run the trainer in 2 processes on the job; returns its wall time in seconds."""
    document = job_document(
        model,
        location("data/clips/", s3=s3, bucket=bucket),
        location("data/start_frames/", s3=s3, bucket=bucket),
        location(out, s3=s3, bucket=bucket),
        training=training,
    )
    caches = [location(f"cache/{d}/", s3=s3, bucket=bucket) for d in ("clips", "frames")]
    with_vae_cache(document, *caches)
    config = tmp_path / f"{out.strip('/')}.json"
    config.write_text(json.dumps(document))
    env = {**os.environ, **s3.credentials.as_env(), "OMP_NUM_THREADS": "1", "LONGCAT_METRICS_PORT": str(free_port()),
           "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "longcat_trainer", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=TIME_LIMIT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "rank0 INFO" in result.stderr and "rank1 INFO" in result.stderr
    return time.monotonic() - started


def test_two_ranks_train_from_s3_with_ddp_and_fsdp(
    s3_server, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    client = s3_server.client()
    data = S3Store(client, s3_bucket, "data/", what="test data")
    write_shapes_dataset(data, count=CLIPS, frames=9, height=64, width=112)

    # Two micro-batches a step: DDP skips the all-reduce on the first (no_sync), FSDP reduces both.
    seconds = torchrun(s3_server, s3_bucket, tiny_checkpoint, "ddp/", tmp_path, gradientAccumulation=2)
    assert seconds < TIME_LIMIT_S
    ddp = S3Store(client, s3_bucket, "ddp/", what="output")
    progress = TrainerProgress.from_json(ddp.get_bytes("progress.json"))
    assert progress.phase == "Succeeded" and progress.world_size == 2 and progress.progress.step == 6
    assert (progress.cache.hits, progress.cache.misses) == (0, CLIPS * 3 + 1)  # clip, start frame, caption; negative
    assert progress.artifacts.lora == f"s3://{s3_bucket}/ddp/lora/pytorch_lora_weights.safetensors"
    ddp_lora = load_safetensors(ddp.get_bytes("lora/pytorch_lora_weights.safetensors"))
    assert len(ddp_lora) == 20 and any(v.abs().max() > 0 for k, v in ddp_lora.items() if "lora_B" in k)
    assert load_safetensors(ddp.get_bytes("lora/longcat_video_lora.safetensors"))
    assert ddp.get_bytes("loss.png")[:4] == b"\x89PNG"

    torchrun(s3_server, s3_bucket, tiny_checkpoint, "fsdp/", tmp_path, parallelism="fsdp", gradientAccumulation=2)
    fsdp = S3Store(client, s3_bucket, "fsdp/", what="output")
    second = TrainerProgress.from_json(fsdp.get_bytes("progress.json"))
    assert second.phase == "Succeeded" and second.progress.step == 6
    assert (second.cache.hits, second.cache.misses) == (CLIPS * 3 + 1, 0)
    fsdp_lora = load_safetensors(fsdp.get_bytes("lora/pytorch_lora_weights.safetensors"))
    assert fsdp_lora.keys() == ddp_lora.keys()
    for key in ddp_lora:
        assert torch.allclose(fsdp_lora[key], ddp_lora[key], atol=1e-5), key
    print(f"torchrun, 2 ranks, {CLIPS} clips, 6 steps with caching: {seconds:.1f}s")
