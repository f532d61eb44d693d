"""The distilled validation sampler: the official 16-step schedule and the checkpoint's cfg-step LoRA stacked on
the trained LoRA without touching it (tiny model, synthetic cfg-step LoRA in the official format)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
import yaml
from PIL import Image

from longcat_job.api import JobSpec, LoraSpec
from longcat_job.model_source import CFG_STEP_LORA, model_file_problems
from longcat_job.storage import LocalStore
from longcat_trainer import denoise, lora, official_lora
from longcat_trainer.commands import sample as sample_command
from longcat_trainer.data.synthetic import write_shapes_dataset
from longcat_trainer.model.loading import load_dit
from tests.fixtures.training import TINY_VALIDATION, job_document, location
from tests.invalid_jobs import MINIMAL

C, T, H, W = 16, 3, 8, 14


@pytest.fixture(scope="module")
def trained(tiny_checkpoint: Path):
    """The tiny DiT with a trained-looking LoRA (B non-zero) and a real final layer."""
    model = load_dit(tiny_checkpoint, dtype=torch.float32).eval()
    lora.add_lora(model, LoraSpec(rank=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs() -> tuple[torch.Tensor, denoise.TextStates, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 12, dtype=torch.int64)
    mask[:, :5] = 1
    return (torch.randn(1, C, 1, H, W, generator=g), (torch.randn(1, 1, 12, 32, generator=g), mask),
            denoise.initial_noise((1, C, T - 1, H, W), 0))


DISTILLED = denoise.SamplerSettings(steps=denoise.DISTILLED_STEPS, guidance=1.0, sampler="distilled", shift=12.0)


def sample(model: torch.nn.Module, settings: denoise.SamplerSettings = DISTILLED) -> torch.Tensor:
    start, prompt, noise = inputs()
    return denoise.sample_latents(model, start, prompt, None, noise, settings)


def test_distilled_schedule_is_the_official_formula() -> None:
    # get_timesteps_sigmas(16, use_distill=True) of the official pipeline, then its scheduler's shift.
    distill = (torch.arange(1, 51, dtype=torch.float32) * (1000 // 50)).round().long()
    picked = np.floor(np.linspace(0, 50, num=16, endpoint=False)).astype(np.int64)
    official = torch.flip(distill, [0])[picked].float() / 1000
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0)
    scheduler.set_timesteps(16, sigmas=official.numpy())
    ours = denoise.sigma_schedule(16, 12.0, "distilled")
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=1e-6, atol=1e-6)
    assert ours.shape == (17,) and ours[0] == 1.0


def test_cfg_step_lora_in_the_tiny_checkpoint_has_the_official_layout(tiny_checkpoint: Path, trained) -> None:
    from safetensors.torch import load_file

    keys = load_file(str(tiny_checkpoint / CFG_STEP_LORA)).keys()
    name = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha_scale"} <= set(keys)
    loaded = official_lora.load(tiny_checkpoint, torch.device("cpu"), torch.float32)
    assert set(loaded) == {k.removesuffix(".lora_A.weight") for k in lora.lora_state(trained) if "lora_A" in k}
    assert all(f.scale == 0.5 for f in loaded.values())  # alpha 2 / rank 4, multiplier 1


def test_inactive_distillation_leaves_the_standard_output_unchanged(tiny_checkpoint: Path, trained) -> None:
    standard = denoise.SamplerSettings(steps=3, guidance=1.0, shift=12.0)
    before = sample(trained, standard)
    cfg_step = official_lora.load(tiny_checkpoint, torch.device("cpu"), torch.float32)
    with official_lora.active(trained, cfg_step):
        changed = sample(trained, standard)
    assert not torch.equal(changed, before)  # the hooks did act
    assert torch.equal(sample(trained, standard), before)  # and are gone
    assert torch.equal(sample(trained, standard), denoise.sample_latents(
        trained, *inputs()[:2], None, inputs()[2], denoise.SamplerSettings(steps=3, guidance=1.0, shift=12.0)))


def test_both_loras_equal_a_model_with_both_deltas_merged(tiny_checkpoint: Path, trained) -> None:
    cfg_step = official_lora.load(tiny_checkpoint, torch.device("cpu"), torch.float32)
    with official_lora.active(trained, cfg_step):
        stacked = sample(trained)
    merged = load_dit(tiny_checkpoint, dtype=torch.float32).eval()
    merged.final_layer.load_state_dict(trained.final_layer.state_dict())
    trained_state = lora.lora_state(trained)
    with torch.no_grad():
        for module, factor in cfg_step.items():
            a, b = trained_state[f"{module}.lora_A.weight"], trained_state[f"{module}.lora_B.weight"]
            merged.get_submodule(module).weight += factor.weight_delta() + (8 / 4) * b @ a
    torch.testing.assert_close(stacked, sample(merged), rtol=1e-4, atol=1e-4)


def test_trained_lora_and_optimizer_state_untouched_by_a_distilled_validation(tiny_checkpoint: Path) -> None:
    model = load_dit(tiny_checkpoint, dtype=torch.float32)
    lora.add_lora(model, LoraSpec(rank=4, alpha=8))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    start, prompt, noise = inputs()
    timestep = torch.full((1, T), 500.0)
    timestep[:, 0] = 0

    def step() -> None:
        x = torch.cat([start, noise], dim=2)
        model(x, timestep, prompt[0], prompt[1], num_cond_latents=1).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()
    snapshot = (copy.deepcopy(lora.lora_state(model)), copy.deepcopy(optimizer.state_dict()))
    grads = [p.grad.clone() for p in params]
    model.eval()
    with official_lora.active(model, official_lora.load(tiny_checkpoint, torch.device("cpu"), torch.float32)):
        sample(model)
    model.train()
    after = lora.lora_state(model)
    assert all(torch.equal(after[k], v) for k, v in snapshot[0].items())
    for (k, s), (_, s2) in zip(snapshot[1]["state"].items(), optimizer.state_dict()["state"].items()):
        assert all(torch.equal(s[n], s2[n]) for n in s), k
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))
    assert not any(m._forward_hooks for m in model.modules())


def job_spec(source: Path, sampler: str) -> JobSpec:
    doc = copy.deepcopy(MINIMAL["spec"])
    doc["model"] = {"source": str(source)}
    doc["validation"] = {**doc.get("validation", {}), "sampler": sampler}
    return JobSpec.model_validate(doc)


def test_preflight_refuses_distilled_without_the_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bare = tmp_path / "LongCat-Video"
    shutil.copytree(tiny_checkpoint, bare, ignore=shutil.ignore_patterns("lora"))
    [problem] = model_file_problems(job_spec(bare, "distilled"))
    assert CFG_STEP_LORA in problem and "sampler standard" in problem and str(bare) in problem
    assert model_file_problems(job_spec(bare, "standard")) == []
    assert model_file_problems(job_spec(tiny_checkpoint, "distilled")) == []


def test_sample_command_distilled_writes_a_video(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    Image.new("RGB", (120, 70), (40, 200, 40)).save(image)
    out = tmp_path / "out.mp4"
    argv = ["--model", str(tiny_checkpoint), "--image", str(image), "--prompt", "a green car", "--out", str(out),
            "--frames", "9", "--resolution", "64x112", "--sampler", "distilled", "--device", "cpu"]
    assert sample_command.main(argv) == 0
    assert out.stat().st_size > 0


def test_a_job_with_sampler_distilled_runs_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`longcat-i2v run` on the CPU: training, then validation with the cfg-step LoRA; videos and index.html."""
    write_shapes_dataset(LocalStore(tmp_path / "data"), count=2, frames=9, height=64, width=112)
    document = job_document(tiny_checkpoint, location("data/clips"), location("data/start_frames"), location("out"),
                            training={"maxSteps": 2, "checkpointEvery": 2},
                            validation={**TINY_VALIDATION, "sampler": "distilled", "maxSamples": 1})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    cli = str(Path(sys.executable).with_name("longcat-i2v"))
    done = subprocess.run([cli, "run", "job.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")})
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert list((out / "validation/step-2").glob("*.mp4")) and (out / "index.html").is_file()
    log_file = Path(re.search(r"trainer log: (\S+)", done.stdout).group(1))
    assert "distilled sampler, 16 steps, guidance 1.0" in log_file.read_text()
