"""8-bit base weights (spec.training.baseQuantization): accuracy of the quantized matmuls, what is replaced,
and a training run with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from longcat_job.api import LoraSpec
from longcat_job.parse import parse_job
from longcat_job.storage import LocalStore
from longcat_trainer import lora, train
from longcat_trainer.data.synthetic import write_shapes_dataset
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel
from longcat_trainer.model.quantize import FORMATS, QUANTIZED_LINEARS, QuantizedLinear, quantize_base, quantize_rows
from longcat_trainer.model.tiny import TINY_DIT_CONFIG
from tests.fixtures.training import job_document, location, with_vae_cache

# Relative error bounds: int8 has 127 steps per row's amax, e4m3 three mantissa bits (2^-4 at worst).
BOUND = {torch.int8: 0.01, torch.float8_e4m3fn: 0.06}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_rows_quantize_within_the_format_precision(dtype: torch.dtype) -> None:
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_rows(w, dtype)
    assert q.dtype == dtype and scale.shape == (64, 1)
    assert rel(q.float() * scale, w) < BOUND[dtype]
    assert (q.float().abs().amax(dim=1) > 0.99 * (127 if dtype == torch.int8 else 448)).all()  # each row uses the range


@pytest.mark.parametrize(("dtype", "fp8_matmuls"),
                         [(torch.int8, False), (torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True)])
def test_quantized_linear_forward_and_input_gradient(dtype: torch.dtype, fp8_matmuls: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96).requires_grad_(False)
    layer = QuantizedLinear(linear, dtype, fp8_matmuls)
    assert layer.fp8_matmuls is fp8_matmuls
    x = torch.randn(2, 40, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = layer(x), linear(x_ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert out.shape == ref.shape and x.grad.shape == x.shape
    # fp8 matmuls also quantize the activations (and the gradient in backward): twice the weight-only error.
    bound = BOUND[dtype] * (2 if fp8_matmuls else 1)
    assert rel(out, ref) < bound
    assert rel(x.grad, x_ref.grad) < bound
    assert not any(p.requires_grad for p in layer.parameters())


def test_quantize_base_replaces_the_block_token_linears_and_lora_still_trains() -> None:
    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(**TINY_DIT_CONFIG)
    lora.add_lora(model, LoraSpec(rank=4))
    with torch.no_grad():  # trained-like adapters, so that they contribute to the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    inputs = {"hidden_states": torch.randn(1, 16, 3, 8, 12), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 1, 8, TINY_DIT_CONFIG["caption_channels"]),
              "num_cond_latents": 1}
    with torch.no_grad():
        before = model(**inputs)
    lora_before = lora.lora_state(model)

    assert quantize_base(model, "int8-quanto") == len(QUANTIZED_LINEARS) * len(model.blocks)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert "blocks.0.ffn.w1" in quantized and "blocks.0.attn.qkv.base_layer" in quantized  # inside LoRA wrappers too
    assert isinstance(model.blocks[0].adaLN_modulation[1], nn.Linear)  # computed in float32: left alone
    torch.testing.assert_close(lora.lora_state(model), lora_before)
    after = model(**inputs)
    assert rel(after, before) < BOUND[torch.int8]

    after.square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert model.blocks[0].attn.qkv.lora_A["default"].weight.grad.abs().sum() > 0


def test_an_unknown_format_is_refused_naming_the_field() -> None:
    model = LongCatVideoTransformer3DModel(**TINY_DIT_CONFIG)
    with pytest.raises(ValueError, match=r"spec.training.baseQuantization: 'nf4'.*fp8-torchao.*int8-quanto"):
        quantize_base(model, "nf4")
    assert set(FORMATS) == {"fp8-torchao", "int8-quanto"}


@pytest.mark.slow
def test_a_job_with_int8_base_weights_trains_and_writes_its_lora(
    tiny_checkpoint: Path, tmp_path: Path, trainer_env: None
) -> None:
    write_shapes_dataset(LocalStore(tmp_path / "data"), count=2, frames=9, height=64, width=112)
    out = tmp_path / "out"
    document = job_document(tiny_checkpoint, location(tmp_path / "data" / "clips"),
                            location(tmp_path / "data" / "start_frames"), location(out),
                            training={"baseQuantization": "int8-quanto", "maxSteps": 2})
    document = with_vae_cache(document, location(tmp_path / "cache" / "clips"), location(tmp_path / "cache" / "frames"))
    seen: list[str] = []

    def after_step(info: train.StepInfo) -> None:
        seen.append(type(info.model.blocks[0].ffn.w1).__name__)

    train.run(parse_job(document), train.Hooks(after_step=after_step))
    assert seen == ["QuantizedLinear", "QuantizedLinear"]
    weights = lora.read_peft_weights((out / "lora" / lora.PEFT_WEIGHTS).read_bytes())
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # the adapters moved
