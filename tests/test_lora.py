"""LoRA on the tiny DiT: training on a fixed batch, and both export formats computing the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors

from longcat_job.api import LoraSpec
from longcat_trainer import flow, lora
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel
from longcat_trainer.model.tiny import TEXT_WIDTH, TINY_DIT_CONFIG


def tiny_dit(seed: int = 0) -> LongCatVideoTransformer3DModel:
    torch.manual_seed(seed)
    return LongCatVideoTransformer3DModel(**TINY_DIT_CONFIG)


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 16, 3, 8, 12, generator=g),
        "timestep": torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]]),
        "encoder_hidden_states": torch.randn(2, 1, 10, TEXT_WIDTH, generator=g),
        "encoder_attention_mask": torch.tensor([[1] * 7 + [0] * 3, [1] * 4 + [0] * 6]),
        "num_cond_latents": 1,
    }


def test_loss_on_a_fixed_batch_goes_down() -> None:
    dit = lora.add_lora(tiny_dit(), LoraSpec(rank=4))
    base = {k: v.clone() for k, v in dit.state_dict().items() if "lora_" not in k}
    g = torch.Generator().manual_seed(4)
    clips, start = torch.randn(2, 16, 3, 8, 12, generator=g), torch.randn(2, 16, 1, 8, 12, generator=g)
    batch = flow.make_flow_batch(clips, start, torch.tensor([0.9, 0.6]), torch.randn(clips.shape, generator=g))
    text = inputs()
    params = [p for p in dit.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in dit.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(12):
        prediction = dit(batch.noisy, batch.timestep, text["encoder_hidden_states"], text["encoder_attention_mask"],
                         num_cond_latents=1)
        loss = flow.flow_loss(prediction, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for key, value in dit.state_dict().items():  # the base stays frozen
        if key in base:
            assert torch.equal(value, base[key]), key


def test_unknown_target_is_refused() -> None:
    with pytest.raises(ValueError, match=r"spec.lora.targets: \['to_q'\] match no Linear"):
        lora.add_lora(tiny_dit(), LoraSpec(targets=["qkv", "to_q"]))


def _official_merge(dit: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """What the official loader computes: W x + alpha_scale * up(down(x)), with the module named by the key."""
    modules = dict(dit.named_modules())
    names = {key.rsplit(".", 2)[0] for key in state if key.endswith(".lora_down.weight")}
    for name in names:
        path = name.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        modules[path].weight.data += state[f"{name}.alpha_scale"] * up @ down


def test_both_export_formats_reproduce_the_trained_model() -> None:
    spec = LoraSpec(rank=4, alpha=8.0)
    trained = lora.add_lora(tiny_dit(), spec)
    for name, param in trained.named_parameters():
        if "lora_B" in name:  # as if trained: B starts at zero
            param.data.normal_(0, 0.05)
    expected = trained(**inputs())
    files = lora.export_files(lora.lora_state(trained), spec)

    official = load_safetensors(files[lora.OFFICIAL_WEIGHTS])
    # Per block: attn.qkv, attn.proj, cross_attn.q_linear/kv_linear/proj (x_embedder.proj is a Conv3d: not adapted).
    assert len(official) == 3 * 2 * 5  # 2 blocks, each adapted Linear with down, up and alpha_scale
    qkv = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert official[f"{qkv}.alpha_scale"] == 2.0 and official[f"{qkv}.lora_down.weight"].shape == (4, 64)
    merged = tiny_dit()
    _official_merge(merged, official)
    assert torch.allclose(merged(**inputs()), expected, atol=1e-5)

    config = json.loads(files[lora.PEFT_CONFIG])
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert len(config["target_modules"]) == 10 and "blocks.1.cross_attn.kv_linear" in config["target_modules"]
    weights = load_safetensors(files[lora.PEFT_WEIGHTS])
    assert all(k.startswith("transformer.blocks.") and (".lora_A." in k or ".lora_B." in k) for k in weights)
    reloaded = lora.add_lora(tiny_dit(), spec)
    lora.load_lora_state(reloaded, lora.read_peft_weights(files[lora.PEFT_WEIGHTS]))
    assert torch.allclose(reloaded(**inputs()), expected, atol=1e-6)
    assert not torch.allclose(tiny_dit()(**inputs()), expected, atol=1e-3)  # the LoRA does change the output
