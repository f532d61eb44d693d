"""The ComfyUI export (ComfyUI-WanVideoWrapper's names for LongCat): the DiT with the exported file merged in by
our reader computes what it computes with the peft LoRA; fused projections split into Wan's q/k/v parts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors

from longcat_job.api import LoraSpec
from longcat_trainer import lora
from longcat_trainer.comfyui_lora import merge_comfyui_lora
from tests.test_lora import inputs, tiny_dit

SPEC = LoraSpec(rank=4, alpha=8.0, targets=["qkv", "proj", "q_linear", "kv_linear", "w2"])


def trained() -> torch.nn.Module:
    dit = lora.add_lora(tiny_dit(), SPEC)
    for name, param in dit.named_parameters():
        if "lora_B" in name:  # as if trained: B starts at zero
            param.data.normal_(0, 0.05)
    return dit


def test_the_exported_file_reproduces_the_peft_lora() -> None:
    source = trained()
    with torch.no_grad():
        expected = source(**inputs())
    tensors = load_safetensors(lora.export_files(lora.lora_state(source), SPEC)[lora.COMFYUI_WEIGHTS])
    merged = tiny_dit()
    merge_comfyui_lora(merged, tensors)
    with torch.no_grad():
        assert torch.allclose(merged(**inputs()), expected, atol=1e-5)
        assert not torch.allclose(tiny_dit()(**inputs()), expected, atol=1e-3)


def test_keys_follow_the_wan_names_with_fused_projections_split() -> None:
    tensors = load_safetensors(lora.export_files(lora.lora_state(trained()), SPEC)[lora.COMFYUI_WEIGHTS])
    block = "diffusion_model.blocks.0"
    for part in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.w2"):
        assert tensors[f"{block}.{part}.lora_A.weight"].shape[0] == 4
        assert tensors[f"{block}.{part}.alpha"] == 8.0  # ComfyUI scales by alpha / rank
    assert tensors[f"{block}.self_attn.k.lora_B.weight"].shape == (64, 4)  # one third of qkv's 192 rows
    assert torch.equal(tensors[f"{block}.self_attn.q.lora_A.weight"], tensors[f"{block}.self_attn.v.lora_A.weight"])
    assert not any("qkv" in k or "kv_linear" in k or "q_linear" in k for k in tensors)
    assert len(tensors) == 2 * 9 * 3  # 2 blocks, 9 Wan modules, A + B + alpha


def test_formats_choose_the_files() -> None:
    state = lora.lora_state(trained())
    assert set(lora.export_files(state, SPEC)) == {lora.PEFT_WEIGHTS, lora.PEFT_CONFIG, lora.OFFICIAL_WEIGHTS,
                                                   lora.COMFYUI_WEIGHTS}
    only = SPEC.model_copy(update={"formats": ["comfyui"]})
    assert set(lora.export_files(state, only)) == {lora.COMFYUI_WEIGHTS}


def test_a_key_of_another_model_is_named() -> None:
    with pytest.raises(KeyError, match="diffusion_model.blocks.7.self_attn.q.lora_A.weight names no module"):
        merge_comfyui_lora(tiny_dit(), {"diffusion_model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(4, 64),
                                        "diffusion_model.blocks.7.self_attn.q.lora_B.weight": torch.zeros(64, 4)})
