"""training.ema: the average's arithmetic, its swap into the model, and a resumed job that continues it exactly
(with caption dropout on, whose draws must repeat too); validation runs on it and says so in index.html."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_job.api import EmaSpec, LoraSpec
from longcat_job.failures import Preempted
from longcat_job.parse import parse_job
from longcat_job.storage import LocalStore
from longcat_trainer import lora, train, validation_videos
from longcat_trainer.data.synthetic import write_shapes_dataset
from longcat_trainer.ema import AdapterEMA
from tests.fixtures.training import job_document, location, with_vae_cache
from tests.test_lora import tiny_dit


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_the_average_follows_decay_and_interval(device: str) -> None:
    dit = lora.add_lora(tiny_dit(), LoraSpec(rank=4))
    ema = AdapterEMA(dit, EmaSpec(decay=0.75, every_steps=2, device=device), torch.device("cpu"))
    name, param = ema.named[0]
    start = param.detach().clone()
    expected = start.clone()
    for step in range(1, 6):
        with torch.no_grad():
            param.add_(1.0)  # what an optimizer step would change
        ema.update(step)
        if step % 2 == 0:
            expected = 0.75 * expected + 0.25 * param.detach()
    assert torch.allclose(ema.average[0], expected, atol=1e-6)
    assert ema.average[0].device.type == "cpu" and ema.average[0].dtype == torch.float32
    trained = param.detach().clone()
    with ema.applied():
        assert torch.allclose(param, expected, atol=1e-6)
        assert torch.allclose(lora.lora_state(dit)[name.replace(".default", "")], expected, atol=1e-6)
    assert torch.equal(param, trained)  # the trained weights are back


def shapes_job(model: Path, shapes: Path, out: Path) -> dict:
    doc = job_document(model, location(shapes / "clips"), location(shapes / "start_frames"), location(out),
                       training={"maxSteps": 4, "checkpointEvery": 2,
                                 "ema": {"decay": 0.5, "everySteps": 1, "device": "cpu"}})
    doc["spec"]["datasets"][0]["captionDropout"] = 0.5
    return with_vae_cache(doc, location(shapes / "cache/clips"), location(shapes / "cache/frames"))


@pytest.mark.slow
def test_a_resumed_job_continues_the_average_exactly(tiny_checkpoint: Path, tmp_path: Path, trainer_env: None) -> None:
    shapes = tmp_path / "shapes"
    write_shapes_dataset(LocalStore(shapes), count=3, frames=9, height=64, width=112)
    validator = validation_videos.Validator()
    validated: list[dict[str, torch.Tensor]] = []

    def validate(info: train.StepInfo) -> list[str]:
        validated.append(lora.lora_state(info.model))
        return validator(info)

    straight = tmp_path / "straight"
    train.run(parse_job(shapes_job(tiny_checkpoint, shapes, straight)), train.Hooks(validate=validate))

    def stop_at_2(info: train.StepInfo) -> None:
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    resumed = tmp_path / "resumed"
    with pytest.raises(Preempted):
        train.run(parse_job(shapes_job(tiny_checkpoint, shapes, resumed)), train.Hooks(after_step=stop_at_2))
    train.run(parse_job(shapes_job(tiny_checkpoint, shapes, resumed)))

    for folder in ("lora", "lora/ema"):
        a = load_file(straight / folder / lora.PEFT_WEIGHTS)
        b = load_file(resumed / folder / lora.PEFT_WEIGHTS)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), folder
    raw, average = load_file(straight / "lora" / lora.PEFT_WEIGHTS), load_file(straight / "lora/ema" / lora.PEFT_WEIGHTS)
    assert any(not torch.allclose(raw[k], average[k], atol=1e-6) for k in raw)
    assert (straight / "lora/ema" / lora.OFFICIAL_WEIGHTS).exists()
    assert (straight / "checkpoints/step-00000004/ema" / lora.PEFT_WEIGHTS).exists()
    # The last validation ran on the EMA, and the page says so.
    assert all(torch.allclose(validated[-1][k], average["transformer." + k], atol=1e-6) for k in validated[-1])
    assert "The videos show the EMA of the adapter weights (decay 0.5" in (straight / "index.html").read_text()
