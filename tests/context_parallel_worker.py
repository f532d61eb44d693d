"""Run under torchrun (gloo, CPU) by tests/test_context_parallel.py; every check compares with one process.

Each rank also computes the unsplit reference itself (same seeds, no process group), so no tensors need to
travel between the reference and the split run. Exits non-zero with the failing check's message.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/context_parallel_worker.py

On GPUs the same checks run with nccl; `--compile` compiles the blocks (with selective checkpointing) as the
trainer does on CUDA (on the CPU inductor takes minutes, so the suite leaves it out).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from longcat_job.api import LoraSpec
from longcat_trainer import distributed, flow, lora
from longcat_trainer.model import context_parallel, recompute
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel
from longcat_trainer.model.tiny import TINY_DIT_CONFIG

HEADS = 4  # the tiny model's 2 heads would not split 4 ways
LATENT_FRAMES, SIDE, TEXT_TOKENS = 8, 4, 6  # 8 frames of 2x2 tokens: 2 frames a rank at N = 4
SEED, STEPS, LR = 7, 5, 1e-2
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cpu")  # this rank's GPU on CUDA: main() takes it from init_world
TOLERANCE = 1e-4 if CUDA else 1e-5  # GPU kernels reduce in other orders than the CPU's
COMPILE = False


def tiny_dit(cp: context_parallel.ContextParallel | None) -> LongCatVideoTransformer3DModel:
    """The tiny DiT with LoRA (non-zero B, so every factor gets a gradient), SAC on, the same on every rank."""
    torch.manual_seed(SEED)
    dit = LongCatVideoTransformer3DModel(**{**TINY_DIT_CONFIG, "num_heads": HEADS})
    lora.add_lora(dit, LoraSpec(rank=4))
    for name, param in dit.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    policies = recompute.policies(len(dit.blocks), enabled=True, kept=recompute.Kept(1))  # one of each kind
    recompute.apply(dit.blocks, policies, compile=COMPILE)
    context_parallel.enable(dit, cp)
    return dit.to(DEVICE)


def batch(index: int, size: int = 1) -> dict[str, torch.Tensor]:
    """Sample `index` of a fixed data set: I2V latents, the start frame, text with padding masked out."""
    g = torch.Generator().manual_seed(1000 + index)
    channels, text_width = TINY_DIT_CONFIG["in_channels"], TINY_DIT_CONFIG["caption_channels"]
    clip = torch.randn(size, channels, LATENT_FRAMES, SIDE, SIDE, generator=g)
    mask = torch.ones(size, TEXT_TOKENS, dtype=torch.long)
    mask[:, TEXT_TOKENS - 2 :] = 0
    data = {"clip": clip, "start": clip[:, :, :1] + 0.1,
            "text": torch.randn(size, 1, TEXT_TOKENS, text_width, generator=g), "text_mask": mask}
    return {k: v.to(DEVICE) for k, v in data.items()}


def loss_of(model: torch.nn.Module, data: dict[str, torch.Tensor], step: int, slot: int) -> torch.Tensor:
    sigma, noise = flow.slot_noise(SEED, step, slot, data["clip"].shape, shift=12.0)
    return flow.training_loss(model, data["clip"], data["start"], data["text"], data["text_mask"], sigma.to(DEVICE),
                              noise.to(DEVICE), torch.float32)


def lora_grads(dit: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}


def check_close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got - want).abs().max().item()
    if not error <= TOLERANCE * max(1.0, want.abs().max().item()):
        sys.exit(f"rank {dist.get_rank()}: {what} differs from one process by {error:.3g}")


def check_split_equals_whole(world: distributed.World) -> None:
    """Forward output and LoRA gradients of one I2V sample split over the group equal the unsplit model's."""
    data = batch(0, size=2)
    whole = tiny_dit(None)
    loss_of(whole, data, 0, 0).backward()
    want_out = whole(*_inputs(data))
    split = tiny_dit(context_parallel.for_world(world))
    loss = loss_of(split, data, 0, 0)
    loss.backward()
    # Parameters collect their rank's shard N times over (context_parallel.py); DDP's world average undoes it.
    for name, grad in lora_grads(split).items():
        dist.all_reduce(grad)
        check_close(f"N={world.context_parallel} gradient of {name}", grad / world.world_size,
                    lora_grads(whole)[name])
    check_close(f"N={world.context_parallel} output", split(*_inputs(data)), want_out)


def _inputs(data: dict[str, torch.Tensor]) -> tuple:
    sigma = torch.tensor([0.3, 0.8], device=DEVICE)
    fb = flow.make_flow_batch(data["clip"], data["start"], sigma, torch.ones_like(data["clip"]))
    return fb.noisy, fb.timestep, data["text"], data["text_mask"], flow.NUM_COND_LATENTS


def train(model: torch.nn.Module, dit: torch.nn.Module, groups: int, group: int, accumulation: int) -> None:
    """STEPS AdamW steps; the step's micro-batch slots are taken as train.py takes them (slot = micro*groups + group)."""
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    for step in range(STEPS):
        for micro in range(accumulation):
            slot = micro * groups + group
            context = distributed.accumulating(model) if micro < accumulation - 1 else torch.enable_grad()
            with context:
                (loss_of(model, batch(step * groups * accumulation + slot), step, slot) / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def check_groups_equal_accumulation(world: distributed.World) -> None:
    """Groups of N under DDP, one sample each, train to the LoRA of one process accumulating over the groups."""
    groups = world.data_parallel_size
    reference = tiny_dit(None)
    train(reference, reference, 1, 0, accumulation=groups)
    dit = tiny_dit(context_parallel.for_world(world))
    train(distributed.wrap(dit, world, "ddp"), dit, groups, world.data_parallel_rank, accumulation=1)
    want = lora.lora_state(reference)
    for name, value in lora.lora_state(dit).items():
        check_close(f"{groups} groups of {world.context_parallel}: LoRA {name} after {STEPS} steps", value, want[name])


def main() -> None:
    global COMPILE, DEVICE
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    COMPILE = parser.parse_args().compile
    torch.set_num_threads(1)
    world = distributed.init_world()  # nccl on GPUs, gloo on the CPU
    DEVICE = world.device
    for n in sorted({2, world.world_size}):
        world = distributed.init_world(n)
        check_split_equals_whole(world)
        if world.data_parallel_size > 1:
            check_groups_equal_accumulation(world)
    dist.barrier()
    print(f"rank {dist.get_rank()}: context parallel checks passed", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
