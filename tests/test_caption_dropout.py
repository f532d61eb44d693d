"""Caption dropout: the draws are a function of (seed, step, rank, micro-batch, sample), a dropped sample trains
on the empty prompt's states, and a job with captionDropout 1 trains as a job without captions does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_job.parse import parse_job
from longcat_job.storage import LocalStore
from longcat_trainer import train
from longcat_trainer.caption_dropout import drop_captions, uniforms
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.training import job_document, location, with_vae_cache


def test_draws_repeat_per_step_and_differ_between_steps_ranks_and_micro_batches() -> None:
    assert torch.equal(uniforms(7, 3, 0, 0, 4), uniforms(7, 3, 0, 0, 4))
    others = [uniforms(7, 4, 0, 0, 4), uniforms(7, 3, 1, 0, 4), uniforms(7, 3, 0, 1, 4), uniforms(8, 3, 0, 0, 4)]
    assert all(not torch.equal(uniforms(7, 3, 0, 0, 4), other) for other in others)
    many = torch.cat([uniforms(7, step, 0, 0, 2) for step in range(2000)])
    assert 0.27 < (many < 0.3).float().mean().item() < 0.33  # a probability of 0.3 drops about 30 %


def test_dropped_samples_get_the_empty_prompt_and_the_others_keep_their_caption() -> None:
    text = torch.randn(3, 1, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3)
    batch = {"text": text, "text_mask": mask, "caption_dropout": torch.tensor([0.0, 1.0, 0.5])}
    empty, empty_mask = torch.zeros(1, 1, 6, 4), torch.tensor([[1, 0, 0, 0, 0, 0]])
    out = drop_captions(batch, torch.tensor([0.0, 0.99, 0.6]), empty, empty_mask)
    assert torch.equal(out["text"][0], text[0]) and torch.equal(out["text"][2], text[2])  # 0.6 >= 0.5: kept
    assert torch.equal(out["text"][1], empty[0]) and out["text_mask"][1].tolist() == [1, 0, 0, 0, 0, 0]
    assert torch.equal(out["text_mask"][0], mask[0])


@pytest.mark.slow
def test_dropout_of_every_caption_trains_as_a_job_without_captions(tiny_checkpoint: Path, tmp_path: Path,
                                                                   trainer_env: None) -> None:
    write_shapes_dataset(LocalStore(tmp_path / "shapes"), count=2, frames=9, height=64, width=112)

    def run(name: str, **dataset: object) -> dict[str, torch.Tensor]:
        doc = job_document(tiny_checkpoint, location(tmp_path / "shapes/clips"),
                           location(tmp_path / "shapes/start_frames"), location(tmp_path / name),
                           training={"maxSteps": 2, "checkpointEvery": 100})
        doc["spec"]["datasets"][0].update(dataset)
        if dataset.get("captionStrategy", "textfile") is None:
            del doc["spec"]["datasets"][0]["captionStrategy"]
        with_vae_cache(doc, location(tmp_path / "cache/clips"), location(tmp_path / "cache/frames"))
        train.run(parse_job(doc))
        return load_file(tmp_path / name / "lora/pytorch_lora_weights.safetensors")

    dropped = run("dropped", captionDropout=1.0)
    uncaptioned = run("uncaptioned", captionStrategy=None)
    captioned = run("captioned")
    assert all(torch.allclose(dropped[k], uncaptioned[k], atol=1e-6) for k in dropped)
    assert any(not torch.allclose(captioned[k], uncaptioned[k], atol=1e-6) for k in captioned)
