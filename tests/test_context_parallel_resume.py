"""Checkpoints move between context-parallel layouts: the real trainer under torchrun (2 processes, gloo).

Two ways to 4 steps over the same 4 clips, each switching layout at step 2: contextParallel 2 with 2 micro-batches
a step, then 1 with one micro-batch on each of the 2 ranks; and the reverse. Both layouts take the same two
samples a step with the same noise (flow.slot_noise), so both runs must end at the same LoRA, and validation
sampling runs split over the group at the end of the second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_job.progress import TrainerProgress
from longcat_job.storage import LocalStore
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.cluster import free_port
from tests.fixtures.training import TINY_VALIDATION, job_document, location, with_vae_cache

pytestmark = pytest.mark.slow
FRAMES = 13  # 4 latent frames: 2 a rank at contextParallel 2
SPLIT = {"contextParallel": 2, "gradientAccumulation": 2}
WHOLE = {"contextParallel": 1, "gradientAccumulation": 1}


def torchrun(tiny_checkpoint: Path, shapes: Path, out: Path, tmp_path: Path, steps: int, layout: dict) -> str:
    """Train the job to `steps` in 2 processes; returns their log."""
    document = job_document(tiny_checkpoint, location(shapes / "clips"), location(shapes / "start_frames"),
                            location(out), training={"maxSteps": steps, "checkpointEvery": 2, **layout},
                            validation={**TINY_VALIDATION, "frames": FRAMES}, resources={"gpusPerNode": 2})
    for dataset in document["spec"]["datasets"]:
        dataset["frames"] = FRAMES
    with_vae_cache(document, location(tmp_path / "cache/clips"), location(tmp_path / "cache/frames"))
    config = tmp_path / f"{out.name}-{steps}.json"
    config.write_text(json.dumps(document))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LONGCAT_METRICS_PORT": "0",
           "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "longcat_trainer", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stderr


def test_checkpoints_resume_across_context_parallel_layouts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shapes = tmp_path / "shapes"
    write_shapes_dataset(LocalStore(shapes), count=4, frames=FRAMES, height=64, width=112)
    loras = {}
    for name, first, second in (("split-then-whole", SPLIT, WHOLE), ("whole-then-split", WHOLE, SPLIT)):
        out = tmp_path / name
        torchrun(tiny_checkpoint, shapes, out, tmp_path, 2, first)
        log = torchrun(tiny_checkpoint, shapes, out, tmp_path, 4, second)
        assert log.count("resuming from checkpoints/step-00000002/ (step 2)") == 2, log[-3000:]
        progress = TrainerProgress.from_json((out / "progress.json").read_bytes())
        assert progress.phase == "Succeeded" and progress.progress.step == 4
        assert len(progress.artifacts.validation_videos) == 1
        loras[name] = load_file(out / "lora/pytorch_lora_weights.safetensors")
    first, second = loras.values()
    assert first.keys() == second.keys()
    assert any(v.abs().max() > 0 for k, v in first.items() if "lora_B" in k)
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-5), key
