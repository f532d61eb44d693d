"""The I2V sampler on the tiny DiT: schedule, conditioning frame, guidance batching, cached keys/values, LoRA."""

from __future__ import annotations

import importlib.util
import json
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from longcat_job.api import LoraSpec, ValidationSpec
from longcat_trainer import denoise, lora, official_lora, preview
from longcat_trainer.commands import sample as sample_command
from longcat_trainer.model.loading import load_dit

C, T, H, W = 16, 3, 8, 14  # latents of a 9-frame 64x112 video


@pytest.fixture(scope="module")
def dit(tiny_checkpoint: Path):
    model = load_dit(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():  # the tiny checkpoint's final layer is zero-initialised: give it a real output
        for p in model.final_layer.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def inputs(seed: int = 0) -> tuple[torch.Tensor, denoise.TextStates, denoise.TextStates, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(1, C, 1, H, W, generator=g)
    mask = torch.zeros(1, 12, dtype=torch.int64)
    mask[:, :5] = 1
    prompt = (torch.randn(1, 1, 12, 32, generator=g), mask)
    negative = (torch.zeros(1, 1, 12, 32), torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), 1))
    return start, prompt, negative, denoise.initial_noise((1, C, T - 1, H, W), seed)


def test_sigmas_match_the_official_scheduler() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0)
    scheduler.set_timesteps(40, sigmas=torch.linspace(1, 0.001, 40).numpy())
    ours = denoise.sigma_schedule(40, 12.0)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=1e-6, atol=1e-6)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and ours[1] > 0.99  # shift 12 spends most steps near noise


def test_cached_conditioning_kv_gives_the_full_forward_output(dit) -> None:
    start, prompt, _, noise = inputs()
    x = torch.cat([start, noise], dim=2).expand(2, -1, -1, -1, -1)
    timestep = torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]])
    text = (prompt[0].expand(2, -1, -1, -1), prompt[1].expand(2, -1))
    with torch.no_grad():
        full = dit(x, timestep, *text, num_cond_latents=1)
        cache = dit.conditioning_cache(start)
        cached = dit(x[:, :, 1:], timestep[:, 1:], *text, cond_cache=cache)
    assert cached.shape == (2, C, T - 1, H, W)
    torch.testing.assert_close(cached, full[:, :, 1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_cond_latents=0"):
        dit(x[:, :, 1:], timestep[:, 1:], *text, num_cond_latents=1, cond_cache=cache)


def settings(**kwargs) -> denoise.SamplerSettings:
    return denoise.SamplerSettings(**{"steps": 3, "guidance": 4.0, **kwargs})


def test_start_frame_stays_bit_identical_and_later_frames_denoise(dit) -> None:
    start, prompt, negative, noise = inputs()
    before = start.clone()
    out = denoise.sample_latents(dit, start, prompt, negative, noise, settings())
    assert out.shape == (1, C, T, H, W)
    assert torch.equal(out[:, :, :1], before) and torch.equal(start, before)
    assert not torch.allclose(out[:, :, 1:], noise, atol=1e-3)


def record_calls(dit) -> tuple[list[tuple[int, int]], torch.utils.hooks.RemovableHandle]:
    calls: list[tuple[int, int]] = []  # (batch, latent frames) of every DiT forward
    handle = dit.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[::2][:2])))
    return calls, handle


@pytest.mark.parametrize(("guidance", "batches"), [(1.0, [1]), (4.0, [2])])
def test_guidance_runs_one_forward_per_step_batched(dit, guidance: float, batches: list[int]) -> None:
    start, prompt, negative, noise = inputs()
    calls, handle = record_calls(dit)
    try:
        denoise.sample_latents(dit, start, prompt, negative, noise, settings(guidance=guidance))
    finally:
        handle.remove()
    assert calls[0] == (1, 1)  # the conditioning frame alone, once
    assert calls[1:] == [(b, T - 1) for b in batches] * 3  # then one forward per step over frames 1..


def test_naive_sampler_gives_the_same_video(dit) -> None:
    """No batching and no cache: two full forwards a step; the result must not change."""
    start, prompt, negative, noise = inputs()
    fast = denoise.sample_latents(dit, start, prompt, negative, noise, settings())
    calls, handle = record_calls(dit)
    try:
        naive = denoise.sample_latents(dit, start, prompt, negative, noise,
                                      settings(batch_guidance=False, reuse_cond_kv=False))
    finally:
        handle.remove()
    assert calls == [(1, T)] * 6
    torch.testing.assert_close(naive, fast, rtol=1e-4, atol=1e-4)


def test_optimized_scale_rescales_the_unconditional_prediction() -> None:
    uncond = torch.randn(1, C, 2, H, W)
    cond = 2 * uncond  # s = <c, u> / |u|^2 = 2, so u s + g (c - u s) = c
    torch.testing.assert_close(denoise.guide(uncond, cond, 4.0, "optimized"), cond)
    torch.testing.assert_close(denoise.guide(uncond, cond, 4.0, "cfg"), 5 * uncond)


def test_guidance_methods_give_different_videos(dit) -> None:
    start, prompt, negative, noise = inputs()
    cfg = denoise.sample_latents(dit, start, prompt, negative, noise, settings())
    optimized = denoise.sample_latents(dit, start, prompt, negative, noise, settings(guidance_method="optimized"))
    assert not torch.allclose(cfg, optimized, atol=1e-4)


def test_zero_lora_gives_the_same_video_as_no_lora(tiny_checkpoint: Path) -> None:
    start, prompt, negative, noise = inputs(1)
    base = load_dit(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in base.final_layer.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    plain = denoise.sample_latents(base, start, prompt, negative, noise, settings())
    lora.add_lora(base, LoraSpec(rank=4))  # peft: A random, B (the up weights) zero
    assert any("lora_B" in n for n, _ in base.named_parameters())
    zero = denoise.sample_latents(base, start, prompt, negative, noise, settings())
    assert torch.equal(zero, plain)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    trained = denoise.sample_latents(base, start, prompt, negative, noise, settings())
    assert not torch.allclose(trained, plain, atol=1e-4)


def decode(path: Path) -> tuple[int, tuple[int, int], Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, (stream.codec_context.width, stream.codec_context.height), stream.average_rate


def test_sample_command_writes_a_playable_mp4_with_a_lora(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    Image.new("RGB", (120, 70), (200, 40, 40)).save(image)
    dit = load_dit(tiny_checkpoint, dtype=torch.float32)
    lora.add_lora(dit, LoraSpec(rank=4, alpha=8))
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    for name, data in lora.export_files(lora.lora_state(dit), LoraSpec(rank=4, alpha=8)).items():
        (lora_dir / name).write_bytes(data)
    out = tmp_path / "preview" / "out.mp4"
    argv = ["--model", str(tiny_checkpoint), "--lora", str(lora_dir), "--image", str(image), "--prompt", "a red car",
            "--out", str(out), "--frames", "9", "--resolution", "64x112", "--steps", "2", "--device", "cpu"]
    assert sample_command.main(argv) == 0
    assert decode(out) == (9, (112, 64), Fraction(16))
    assert Image.open(out.with_suffix(".png")).width == 2 * 112


def trained_lora_dir(tiny_checkpoint: Path, folder: Path) -> tuple[Path, LoraSpec]:
    """A LoRA export of the tiny model as training writes it, with B != 0 (a fresh one's would change nothing)."""
    spec = LoraSpec(rank=4, alpha=8)
    dit = load_dit(tiny_checkpoint, dtype=torch.float32)
    lora.add_lora(dit, spec)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    folder.mkdir()
    for name, data in lora.export_files(lora.lora_state(dit), spec).items():
        (folder / name).write_bytes(data)
    return folder, spec


def test_lora_strength_scales_the_lora_s_change(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    Image.new("RGB", (120, 70), (40, 200, 40)).save(image)
    lora_dir, _ = trained_lora_dir(tiny_checkpoint, tmp_path / "lora")
    spec = ValidationSpec(resolution="64x112", frames=9, num_inference_steps=2)
    steps: list[tuple[int, int]] = []

    def frames(**lora_args: object) -> torch.Tensor:
        job = preview.Preview(tiny_checkpoint, image, "start.png", "a green car", spec, **lora_args)
        return preview.generate(job, torch.device("cpu"), lambda done, total: steps.append((done, total)))

    plain = frames()
    assert steps == [(1, 2), (2, 2)]
    assert torch.equal(frames(lora=lora_dir, lora_strength=0.0), plain)
    assert not torch.equal(frames(lora=lora_dir, lora_strength=1.0), plain)


def test_hooked_lora_equals_peft_s_layers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The preview hooks an exported LoRA onto the loaded model instead of adding peft's layers: the same outputs
    as the model trained with it, at strength 1 and scaled at another strength."""
    lora_dir, spec = trained_lora_dir(tiny_checkpoint, tmp_path / "lora")
    start, prompt, _, noise = inputs(3)
    x = torch.cat([start, noise], dim=2)
    args = (x, torch.tensor([500.0]), prompt[0], prompt[1])
    base = load_dit(tiny_checkpoint, dtype=torch.float32).eval()
    peft_model = load_dit(tiny_checkpoint, dtype=torch.float32).eval()
    lora.add_lora(peft_model, spec)
    state = lora.read_peft_weights((lora_dir / lora.PEFT_WEIGHTS).read_bytes())
    with torch.no_grad():
        plain = base(*args, num_cond_latents=1)
        for strength in (1.0, 0.5):
            lora.load_lora_state(peft_model, {k: v * strength if ".lora_B." in k else v for k, v in state.items()})
            expected = peft_model(*args, num_cond_latents=1)
            hooked = preview.trained_lora(lora_dir, strength, torch.device("cpu"), torch.float32)
            with official_lora.active(base, hooked):
                got = base(*args, num_cond_latents=1)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got, plain, atol=1e-4)
        assert torch.equal(base(*args, num_cond_latents=1), plain)  # the hooks are gone with the block


def test_a_loaded_model_serves_previews_one_after_another(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The UI's worker keeps one PreviewModel: a preview without a LoRA after one with it is the video of a
    freshly loaded model (the LoRA left nothing behind), and the model was loaded once."""
    image = tmp_path / "start.png"
    Image.new("RGB", (120, 70), (40, 40, 200)).save(image)
    lora_dir, _ = trained_lora_dir(tiny_checkpoint, tmp_path / "lora")
    spec = ValidationSpec(resolution="64x112", frames=9, num_inference_steps=2)

    def job(**lora_args: object) -> preview.Preview:
        return preview.Preview(tiny_checkpoint, image, "start.png", "a blue car", spec, **lora_args)

    model = preview.PreviewModel(tiny_checkpoint, torch.device("cpu"))
    stack = model.stack
    with_lora = model.generate(job(lora=lora_dir))
    after = model.generate(job())
    assert model.stack is stack
    assert torch.equal(after, preview.generate(job(), torch.device("cpu")))
    assert not torch.equal(with_lora, after)
    assert torch.equal(model.generate(job(lora=lora_dir)), with_lora)


def test_sample_command_names_the_bad_flag(tiny_checkpoint: Path, tmp_path: Path) -> None:
    argv = ["--model", str(tiny_checkpoint), "--image", str(tmp_path / "x.png"), "--prompt", "p", "--out",
            str(tmp_path / "o.mp4"), "--frames", "10", "--resolution", "64x100"]
    with pytest.raises(SystemExit) as excinfo:
        sample_command.main(argv)
    message = str(excinfo.value)
    assert "--frames" in message and "--resolution" in message
    with pytest.raises(SystemExit, match="--image"):
        sample_command.main(argv[:-4] + ["--frames", "9", "--resolution", "64x112"])


def test_validation_bench_runs_tiny_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("validation_bench", Path(__file__).parents[1] / "bench" / "validation_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--steps", "1", "--variants", "optimized,naive"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shape"] == "64x112x9" and set(report["results"]) == {"naive", "optimized"}
    assert report["results"]["naive"]["vs_naive"] == 1.0 and report["results"]["optimized"]["seconds_per_step"] > 0
