"""Seconds per validation video: our I2V sampler against a naive one, full-size DiT with random bf16 weights.

The DiT is the released architecture (shared/reference/longcat_dit_tensors.json's config, 13.6B) with random
weights; latents, caption states and noise are random. Timed: the denoising loop only (the VAE decode and the
text encoder are the same for both and run once a video). Variants, each warmed up by one step first:

    naive      two batch-1 forwards a step (negative, positive), the conditioning frame recomputed, eager
    optimized  what validation runs: one batch-2 forward a step over the noisy frames, conditioning k/v cached
    compiled   optimized with every block torch.compile'd (compile time reported apart); alias standard-compiled
    cudnn      optimized with scaled_dot_product_attention limited to the cuDNN kernel
    distilled-compiled  validation.sampler distilled: 16 steps of the distillation schedule, no guidance, a random
               rank-128 cfg-step LoRA (alpha 64, as the release's) hooked on the adapted Linears, compiled

"standard" is an alias of optimized. Each compiled variant is traced fresh (torch._dynamo.reset()). A distilled
video is DISTILLED_STEPS steps, a standard one --video-steps; vs_standard compares seconds per video.
The issue-21 run (one process on the H200):

    .venv/bin/python bench/validation_bench.py --steps 4 --variants standard,standard-compiled,distilled-compiled

A full run (480x832, 93 frames, 40 steps, guidance 4.0) takes ~8 min naive on an H100; `--steps 4` gives the
per-step figures in a minute, and seconds per video are extrapolated to --video-steps (40).

    .venv/bin/python bench/validation_bench.py [--steps 4] [--frames 93] [--variants naive,optimized]
    .venv/bin/python bench/validation_bench.py --tiny      # CPU, tiny model: checks the logic only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_trainer import official_lora  # noqa: E402
from longcat_trainer.denoise import (  # noqa: E402
    DISTILLED_STEPS,
    SamplerSettings,
    initial_noise,
    latent_frames,
    sample_latents,
)
from longcat_trainer.metrics import RateLog  # noqa: E402
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel  # noqa: E402
from longcat_trainer.model.tiny import TINY_DIT_CONFIG  # noqa: E402

REFERENCE = Path("/work/shared/reference/longcat_dit_tensors.json")
FULL_CONFIG = {  # the released dit/config.json (also in REFERENCE when that file is present)
    "in_channels": 16, "out_channels": 16, "hidden_size": 4096, "depth": 48, "num_heads": 32,
    "caption_channels": 4096, "mlp_ratio": 4, "adaln_tembed_dim": 512, "frequency_embedding_size": 256,
    "patch_size": [1, 2, 2], "cp_split_hw": [1, 1], "text_tokens_zero_pad": True,
}
TEXT_TOKENS = 512
PROMPT_TOKENS = 40
VARIANTS = ("naive", "optimized", "standard", "compiled", "standard-compiled", "cudnn", "distilled-compiled")
CFG_STEP_RANK, CFG_STEP_ALPHA = 128, 64.0  # the official load_lora defaults the release's file is read with

log = logging.getLogger("validation_bench")


def build_dit(config: dict, device: torch.device, dtype: torch.dtype) -> LongCatVideoTransformer3DModel:
    """Random weights straight on the device (no host copy of 13.6B parameters)."""
    with torch.device("meta"):
        dit = LongCatVideoTransformer3DModel(**config)
    dit = dit.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return dit.eval().requires_grad_(False)


def settings_for(variant: str, args: argparse.Namespace, steps: int) -> SamplerSettings:
    if variant.startswith("distilled"):
        return SamplerSettings(steps=steps, guidance=1.0, sampler="distilled")
    fast = variant != "naive"
    return SamplerSettings(steps=steps, guidance=args.guidance, guidance_method=args.guidance_method,
                           batch_guidance=fast, reuse_cond_kv=fast)


def attention_context(variant: str):  # noqa: ANN201
    if variant != "cudnn":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, float32 (a logic check)")
    parser.add_argument("--steps", type=int, default=40, help="denoising steps timed per variant")
    parser.add_argument("--video-steps", type=int, default=40, help="steps of a validation video (extrapolation)")
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--resolution", default="480x832", help="HEIGHTxWIDTH")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--guidance-method", choices=["cfg", "optimized"], default="cfg")
    parser.add_argument("--variants", default="naive,optimized", help=f"comma-separated, of {','.join(VARIANTS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # Compiling is in place and stays: the compiled variants run last, each traced afresh.
    variants = sorted(args.variants.split(","), key=lambda v: "compiled" in v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    if args.tiny:
        config, device, dtype = TINY_DIT_CONFIG, torch.device("cpu"), torch.float32
        if args.resolution == "480x832":
            args.resolution = "64x112"
        if args.frames == 93:
            args.frames = 9
    else:
        if REFERENCE.is_file():
            FULL_CONFIG.update(json.loads(REFERENCE.read_text())["config"])
        config, device, dtype = FULL_CONFIG, torch.device("cuda"), torch.bfloat16
    height, width = (int(v) for v in args.resolution.split("x"))
    shape = (1, config["in_channels"], latent_frames(args.frames) - 1, height // 8, width // 8)

    started = time.monotonic()
    dit = build_dit(config, device, dtype)
    log.info("DiT with %.2fB parameters built in %.1fs", sum(p.numel() for p in dit.parameters()) / 1e9, time.monotonic() - started)
    g = torch.Generator().manual_seed(1)
    start = torch.randn(1, *shape[1:2], 1, *shape[3:], generator=g).to(device)
    width_text = config["caption_channels"]
    states = torch.randn(1, 1, TEXT_TOKENS, width_text, generator=g).to(device, dtype)
    prompt_mask = (torch.arange(TEXT_TOKENS) < PROMPT_TOKENS).long()[None].to(device)
    negative_mask = (torch.arange(TEXT_TOKENS) < 1).long()[None].to(device)
    prompt, negative = (states, prompt_mask), (torch.zeros_like(states), negative_mask)
    noise = initial_noise(shape, seed=0)

    results: dict[str, dict] = {}
    cfg_step: official_lora.OfficialLora = {}
    if any(v.startswith("distilled") for v in variants):
        state = official_lora.synthetic_state(dit, ["qkv", "proj", "q_linear", "kv_linear"], CFG_STEP_RANK,
                                              alpha=CFG_STEP_ALPHA)
        cfg_step = official_lora.moved(official_lora.parse(state), device, dtype)
    for variant in variants:
        compile_s = 0.0
        compiled = "compiled" in variant
        steps = DISTILLED_STEPS if variant.startswith("distilled") else args.steps
        video_steps = DISTILLED_STEPS if variant.startswith("distilled") else args.video_steps
        if compiled:
            torch._dynamo.reset()
            for block in dit.blocks:
                block.compile()
        lora_hooks = official_lora.active(dit, cfg_step if variant.startswith("distilled") else {})
        with attention_context(variant), lora_hooks:
            warm = time.monotonic()
            sample_latents(dit, start, prompt, negative, noise, settings_for(variant, args, 1))
            synchronize(device)
            if compiled:
                compile_s = time.monotonic() - warm
            rate = RateLog(variant, steps, " steps")
            began = time.monotonic()
            sample_latents(dit, start, prompt, negative, noise, settings_for(variant, args, steps), on_step=rate.update)
            synchronize(device)
        seconds = time.monotonic() - began
        per_step = seconds / steps
        results[variant] = {"seconds": round(seconds, 3), "seconds_per_step": round(per_step, 3),
                            "seconds_per_video": round(per_step * video_steps, 1)}
        if compile_s:
            results[variant]["compile_seconds"] = round(compile_s, 1)
        if device.type == "cuda":
            results[variant]["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
            torch.cuda.reset_peak_memory_stats(device)
        log.info("%s: %s", variant, results[variant])
    if "naive" in results:
        for variant, result in results.items():
            result["vs_naive"] = round(result["seconds"] / results["naive"]["seconds"], 3)
    baseline = results.get("standard") or results.get("optimized")
    if baseline:
        for result in results.values():
            result["vs_standard"] = round(result["seconds_per_video"] / baseline["seconds_per_video"], 3)
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "shape": f"{height}x{width}x{args.frames}", "latents": list(shape), "guidance": args.guidance,
                      "steps_timed": args.steps, "video_steps": args.video_steps, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
