"""Checkpoints resume exactly: 6 steps straight equal 3 steps, SIGTERM, and 3 more (one process, local dirs)."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_job.failures import Preempted
from longcat_job.parse import parse_job
from longcat_job.progress import TrainerProgress
from longcat_job.storage import LocalStore
from longcat_trainer import train
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.cluster import free_port
from tests.fixtures.training import job_document, location, with_vae_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(LocalStore(root), count=3, frames=9, height=64, width=112)
    return root


def job(tiny_checkpoint: Path, shapes: Path, out: Path, cache: Path):
    document = job_document(tiny_checkpoint, location(shapes / "clips"), location(shapes / "start_frames"),
                            location(out), validation={"everySteps": 2}, training={"gradientAccumulation": 2})
    return parse_job(with_vae_cache(document, location(cache / "clips"), location(cache / "frames")))


def progress(out: Path) -> TrainerProgress:
    return TrainerProgress.from_json((out / "progress.json").read_bytes())


def test_resume_after_sigterm_equals_a_straight_run(
    tiny_checkpoint: Path, shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer_env: None
) -> None:
    port = free_port()
    monkeypatch.setenv("LONGCAT_METRICS_PORT", str(port))
    straight = tmp_path / "straight"
    validated: list[tuple[int, bool]] = []

    def validate(info: train.StepInfo) -> list[str]:
        validated.append((info.step, info.model.training))
        return [f"video-{info.step}.mp4"]

    train.run(job(tiny_checkpoint, shapes, straight, tmp_path / "cache"), train.Hooks(validate=validate))
    assert validated == [(2, False), (4, False), (6, False)]  # every 2 steps and at the end, in eval mode
    done = progress(straight)
    assert done.artifacts.validation_videos == ["video-2.mp4", "video-4.mp4", "video-6.mp4"]
    assert done.phase == "Succeeded" and done.progress.step == 6 and done.cache.misses == 3 * 3 + 1
    assert [c.rsplit("/", 2)[-2] for c in done.artifacts.checkpoints] == ["step-00000003", "step-00000006"]
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'longcat_trainer_step{job="tiny"} 6.0' in scraped
    assert 'longcat_trainer_cache_entries_total{job="tiny",result="miss"} 10.0' in scraped
    monkeypatch.setenv("LONGCAT_METRICS_PORT", "0")

    resumed = tmp_path / "resumed"
    steps_seen: list[int] = []

    def stop_at_3(info: train.StepInfo) -> None:
        steps_seen.append(info.step)
        if info.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what Kubernetes sends on pre-emption

    with pytest.raises(Preempted, match="stopped at step 3"):
        train.run(job(tiny_checkpoint, shapes, resumed, tmp_path / "cache"), train.Hooks(after_step=stop_at_3))
    stopped = progress(resumed)
    assert stopped.phase == "Preempted" and stopped.progress.step == 3 and stopped.cache.hits == 10
    assert json.loads((resumed / "checkpoints/latest").read_text())["step"] == 3

    train.run(job(tiny_checkpoint, shapes, resumed, tmp_path / "cache"), train.Hooks(after_step=stop_at_3))
    assert steps_seen == [1, 2, 3, 4, 5, 6]  # the second run trained steps 4..6 only
    assert progress(resumed).phase == "Succeeded"

    a = load_file(straight / "lora/pytorch_lora_weights.safetensors")
    b = load_file(resumed / "lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) == 20
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    initial_b = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().max() > 0 for k in initial_b)  # it trained: B left zero
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (straight / "lora/longcat_video_lora.safetensors").exists()
