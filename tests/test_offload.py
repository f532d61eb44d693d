"""training.offload: blocks (model/offload.py) on the CPU: the block weights leave the device between uses, and
the loss and LoRA gradients are those of the model that keeps them, under every checkpointing plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longcat_job.api import LoraSpec
from longcat_job.parse import parse_job
from longcat_job.storage import LocalStore
from longcat_trainer import lora, train
from longcat_trainer.data.synthetic import write_shapes_dataset
from longcat_trainer.model import offload
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel
from longcat_trainer.model.prepare import BlockPlan
from longcat_trainer.model.recompute import Kept
from longcat_trainer.model.tiny import TINY_DIT_CONFIG
from tests.fixtures.training import job_document, location, with_vae_cache

DEPTH = 4  # a first block, a last one and two between: every prefetch case
CPU = torch.device("cpu")
# On CUDA the same test checks the side stream's synchronisation: a use before its copy reads other bytes.
DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="no CUDA device"))]


def tiny_lora_model() -> LongCatVideoTransformer3DModel:
    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(**{**TINY_DIT_CONFIG, "depth": DEPTH})
    lora.add_lora(model, LoraSpec(rank=4))
    with torch.no_grad():  # adapters as after some training: B = 0 would leave A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def inputs(seed: int = 1, device: torch.device = CPU) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: tensor.to(device) for name, tensor in {
        "hidden_states": torch.randn(2, 16, 3, 4, 6, generator=g),
        "timestep": torch.rand(2, 3, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(2, 1, 6, TINY_DIT_CONFIG["caption_channels"], generator=g),
        "encoder_attention_mask": torch.ones(2, 6, dtype=torch.int64),
    }.items()}


def frozen_block_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.blocks.parameters() if not p.requires_grad]


def loss_and_lora_grads(plan: BlockPlan, streamed: bool, device: torch.device, steps: int = 2
                        ) -> tuple[list[float], dict, list]:
    """Two forward/backward passes (the second one finds the first one's leftovers, if any); what was on the
    device after each block's forward, and after each backward."""
    torch._dynamo.reset()
    model = tiny_lora_model()
    blocks = offload.stream_blocks(model, device) if streamed else None
    model.to(device)  # with offload: only what is not streamed, the rest is there already (empty)
    plan.apply(model, blocks)
    seen = []
    if blocks is not None:
        for index, block in enumerate(model.blocks):
            block.register_forward_hook(
                lambda module, args, out, index=index: seen.append((index, [blocks.resident(i) for i in range(DEPTH)])))
    losses = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs(seed=step, device=device), num_cond_latents=1).square().mean()
        loss.backward()
        losses.append(loss.item())
        if blocks is not None:
            seen.append(("after backward", [blocks.resident(i) for i in range(DEPTH)]))
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, seen


PLANS = {
    "no checkpointing": BlockPlan(checkpointing=False, kept=Kept(0), compile=False),
    "whole blocks recomputed": BlockPlan(checkpointing=True, kept=Kept(0), compile=False),
    "selective checkpointing": BlockPlan(checkpointing=True, kept=Kept(2), compile=False),
    "compiled selective checkpointing, matmuls kept": BlockPlan(checkpointing=True, kept=Kept(2, matmuls=1),
                                                                compile=True),
}


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("name", PLANS)
def test_streamed_blocks_give_the_resident_models_loss_and_lora_gradients(name, device):
    plan = PLANS[name]
    resident_losses, resident_grads, _ = loss_and_lora_grads(plan, streamed=False, device=device)
    losses, grads, seen = loss_and_lora_grads(plan, streamed=True, device=device)
    assert losses == pytest.approx(resident_losses, rel=1e-6)
    assert grads.keys() == resident_grads.keys() and any("blocks.0." in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], resident_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(g.abs().sum() > 0 for g in grads.values())
    # After block i's forward: block i is gone again and only the next one is in (copied ahead); the last one
    # stays for the backward that follows at once. After backward nothing is left.
    forward = [(i, resident) for i, resident in seen if i != "after backward"]
    expected = [[j == i + 1 for j in range(DEPTH)] for i in range(DEPTH - 1)] + [[j == DEPTH - 1 for j in range(DEPTH)]]
    assert [resident for _, resident in forward] == expected * 2
    assert [resident for i, resident in seen if i == "after backward"] == [[False] * DEPTH] * 2


def test_emptied_weights_hold_no_bytes_and_come_back_unchanged():
    model = tiny_lora_model()
    before = {n: p.detach().clone() for n, p in model.blocks.named_parameters() if not p.requires_grad}
    blocks = offload.stream_blocks(model, CPU)
    BlockPlan(checkpointing=True, kept=Kept(0), compile=False).apply(model, blocks)
    params = dict(model.blocks.named_parameters())
    assert all(params[n].untyped_storage().nbytes() == 0 for n in before)
    assert all(p.untyped_storage().nbytes() > 0 for p in model.blocks.parameters() if p.requires_grad)  # adapters
    with torch.no_grad():  # a sampling pass: every block comes and goes, the last one too
        model(**inputs(), num_cond_latents=1)
    assert not any(blocks.resident(i) for i in range(DEPTH))
    blocks._arrive(1)  # the bytes that come back are the loaded ones, in the parameters' own shapes
    for n, value in before.items():
        if n.startswith("1."):
            torch.testing.assert_close(params[n], value, rtol=0, atol=0, msg=n)


@pytest.mark.slow
def test_a_job_with_offloaded_blocks_trains_the_lora_of_one_without(tiny_checkpoint: Path, tmp_path: Path,
                                                                    trainer_env: None) -> None:
    """train.py's path: the DiT loaded on the CPU, prepared with its blocks streamed, two optimizer steps."""
    write_shapes_dataset(LocalStore(tmp_path / "data"), count=2, frames=9, height=64, width=112)

    def trained(offloaded: str) -> tuple[dict[str, torch.Tensor], list[int]]:
        out = tmp_path / offloaded
        document = job_document(tiny_checkpoint, location(tmp_path / "data" / "clips"),
                                location(tmp_path / "data" / "start_frames"), location(out),
                                training={"offload": offloaded, "maxSteps": 2})
        document = with_vae_cache(document, location(out / "cache" / "clips"), location(out / "cache" / "frames"))
        held: list[int] = []

        def after_step(info: train.StepInfo) -> None:
            held.append(sum(p.untyped_storage().nbytes() for p in frozen_block_params(info.model)))

        train.run(parse_job(document), train.Hooks(after_step=after_step))
        return lora.read_peft_weights((out / "lora" / lora.PEFT_WEIGHTS).read_bytes()), held

    resident, resident_held = trained("none")
    streamed, streamed_held = trained("blocks")
    assert resident_held[0] > 0 and streamed_held == [0, 0]
    assert resident.keys() == streamed.keys()
    for name in resident:
        torch.testing.assert_close(streamed[name], resident[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(v.abs().sum() > 0 for k, v in streamed.items() if "lora_B" in k)  # the adapters moved
