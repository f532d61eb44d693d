"""Our LongCat-Video DiT against the official tensor list and outputs in /work/shared/reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from longcat_trainer.model import recompute
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel
from longcat_trainer.model.recompute import MATMUL_OPS, SDPA_OPS, Kept
from longcat_trainer.model.tiny import TINY_DIT_CONFIG

REFERENCE = Path("/work/shared/reference")
TENSORS_JSON = REFERENCE / "longcat_dit_tensors.json"
TINY_REFERENCE = REFERENCE / "longcat_dit_tiny_reference.safetensors"
RELEASED_PARAMS = 13_581_071_424

needs_reference = pytest.mark.skipif(not TENSORS_JSON.exists(), reason="shared/reference is not present")


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(TINY_REFERENCE, framework="pt") as handle:
        return json.loads(handle.metadata()["config"]), {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.fixture(scope="module")
def reference_model(reference) -> LongCatVideoTransformer3DModel:
    config, tensors = reference
    model = LongCatVideoTransformer3DModel(**config).eval()
    weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    model.load_state_dict(weights, strict=True)
    return model


def tiny_model(seed: int = 0, depth: int = TINY_DIT_CONFIG["depth"]) -> LongCatVideoTransformer3DModel:
    torch.manual_seed(seed)
    return LongCatVideoTransformer3DModel(**{**TINY_DIT_CONFIG, "depth": depth})


def tiny_inputs(batch: int = 2, frames: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 6, dtype=torch.int64)
    for i in range(batch):
        mask[i, : 6 - 2 * i] = 1
    return {
        "hidden_states": torch.randn(batch, 16, frames, 4, 6, generator=g),
        "timestep": torch.rand(batch, frames, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(batch, 1, 6, TINY_DIT_CONFIG["caption_channels"], generator=g),
        "encoder_attention_mask": mask,
    }


@needs_reference
def test_released_config_has_exactly_the_official_tensors():
    spec = json.loads(TENSORS_JSON.read_text())
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**spec["config"])
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert len(shapes) == 1022
    assert set(shapes) == set(spec["tensors"]), set(shapes) ^ set(spec["tensors"])
    assert shapes == spec["tensors"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"] == RELEASED_PARAMS


@needs_reference
@pytest.mark.parametrize(
    ("output", "timestep", "num_cond_latents"),
    [("outputs.i2v_num_cond_latents_1", "inputs.timestep_i2v", 1), ("outputs.t2v", "inputs.timestep_t2v", 0)],
)
def test_reproduces_official_outputs(reference, reference_model, output, timestep, num_cond_latents):
    _, tensors = reference
    with torch.no_grad():
        got = reference_model(
            tensors["inputs.hidden_states"],
            tensors[timestep],
            tensors["inputs.encoder_hidden_states"],
            tensors["inputs.encoder_attention_mask"],
            num_cond_latents=num_cond_latents,
        )
    assert got.dtype == torch.float32 and got.shape == tensors[output].shape
    torch.testing.assert_close(got, tensors[output], atol=1e-4, rtol=0)


class KernelCalls(TorchDispatchMode):
    """Counts the attention kernels that run, self-attention (keys >= queries) apart from cross-attention, and the
    matmuls that read the token stream (`width` wide) and widen it (qkv, SwiGLU w1 and w3, kv_linear)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.self_attention = self.cross_attention = self.widening_matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SDPA_OPS:
            if args[1].shape[-2] >= args[0].shape[-2]:
                self.self_attention += 1
            else:
                self.cross_attention += 1
        elif func in MATMUL_OPS:
            weight = args[2] if func is torch.ops.aten.addmm.default else args[1]
            # forward products only: backward's grad @ W reads the wide side and narrows
            self.widening_matmuls += weight.shape[-2] == self.width < weight.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kept", [Kept(0), Kept(1), Kept(2), Kept(2, matmuls=1), Kept(2, matmuls=2)])
def test_gradient_checkpointing_gives_the_same_gradients(kept):
    inputs = tiny_inputs()

    def grads(checkpointed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], KernelCalls]:
        model = tiny_model()
        policies = recompute.policies(len(model.blocks), enabled=checkpointed, kept=kept)
        recompute.apply(model.blocks, policies, compile=False)
        latents = inputs["hidden_states"].clone().requires_grad_()
        with KernelCalls(model.config.hidden_size) as calls:
            out = model(**{**inputs, "hidden_states": latents}, num_cond_latents=1)
            (out.square().mean()).backward()
        return latents.grad, {n: p.grad for n, p in model.named_parameters()}, calls

    plain_input_grad, plain, plain_calls = grads(False)
    ckpt_input_grad, ckpt, ckpt_calls = grads(True)
    torch.testing.assert_close(ckpt_input_grad, plain_input_grad)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)
    assert plain["blocks.0.attn.qkv.weight"].abs().sum() > 0
    # Every checkpointed block runs its forward again in backward, but self-attention only in the blocks
    # that do not keep its output (two kernels per block: conditioning tokens, then the noisy ones), and the
    # widening matmuls (4 per block) only in the blocks that do not keep theirs.
    blocks = len(tiny_model().blocks)
    assert plain_calls.self_attention == 2 * blocks and plain_calls.cross_attention == blocks
    assert ckpt_calls.self_attention == 2 * blocks + 2 * (blocks - kept.attention)
    assert ckpt_calls.cross_attention == 2 * blocks
    assert plain_calls.widening_matmuls >= 4 * blocks  # and the embedders'
    assert ckpt_calls.widening_matmuls == plain_calls.widening_matmuls + 4 * (blocks - kept.matmuls)


def test_compiled_checkpointing_gives_the_eager_gradients():
    """The trainer's default on CUDA, on the CPU: compiled blocks, one keeping its self-attention output and
    widening matmuls' outputs, one its self-attention output, one recomputed whole (the partitioner follows the
    selective policies); the gradients must be the eager model's without checkpointing. A policy the compiler
    mis-partitions (say, a saved attention output paired with recomputed queries of another layout) shows here as
    a gap far above float32 rounding."""
    inputs = tiny_inputs()

    def grads(checkpointed: bool, compiled: bool) -> dict[str, torch.Tensor]:
        torch._dynamo.reset()  # dynamo guards on neither the policy nor the kernel: trace each model afresh
        model = tiny_model(depth=3)
        policies = recompute.policies(len(model.blocks), enabled=checkpointed, kept=Kept(2, matmuls=1))
        assert not checkpointed or policies == [recompute.Recompute.ELEMENTWISE,
                                                recompute.Recompute.ALL_BUT_ATTENTION, recompute.Recompute.ALL]
        recompute.apply(model.blocks, policies, compile=compiled)
        latents = inputs["hidden_states"].clone().requires_grad_()
        out = model(**{**inputs, "hidden_states": latents}, num_cond_latents=1)
        (out.square().mean()).backward()
        return {"input": latents.grad, **{n: p.grad for n, p in model.named_parameters()}}

    eager, compiled = grads(False, False), grads(True, True)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)
    assert eager["blocks.2.attn.qkv.weight"].abs().sum() > 0


def test_per_sample_timestep_equals_the_same_timestep_on_every_frame():
    model, inputs = tiny_model().eval(), tiny_inputs()
    per_sample = torch.tensor([250.0, 700.0])
    with torch.no_grad():
        a = model(**{**inputs, "timestep": per_sample})
        b = model(**{**inputs, "timestep": per_sample[:, None].expand(-1, 3)})
        c = model(**{**inputs, "timestep": torch.tensor([[250.0, 250.0, 999.0], [700.0, 700.0, 700.0]])})
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Per-frame timesteps modulate per frame: changing frame 2 of sample 0 changes that sample only.
    assert not torch.allclose(a[0], c[0])
    torch.testing.assert_close(a[1], c[1])


def test_conditioning_frame_sees_neither_noisy_frames_nor_text():
    model, inputs = tiny_model().eval(), tiny_inputs()
    other = tiny_inputs(seed=7)
    changed = {
        **inputs,
        "hidden_states": torch.cat([inputs["hidden_states"][:, :, :1], other["hidden_states"][:, :, 1:]], dim=2),
        "timestep": torch.cat([inputs["timestep"][:, :1], other["timestep"][:, 1:]], dim=1),
        "encoder_hidden_states": other["encoder_hidden_states"],
    }
    with torch.no_grad():
        a = model(**inputs, num_cond_latents=1)
        b = model(**changed, num_cond_latents=1)
        t2v = model(**changed, num_cond_latents=0)
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])
    # Without conditioning the first frame does attend to the rest.
    assert not torch.allclose(t2v[:, :, 0], b[:, :, 0])


def test_zero_padded_text_ignores_values_behind_the_mask():
    model, inputs = tiny_model().eval(), tiny_inputs()
    noisy_padding = inputs["encoder_hidden_states"].clone()
    noisy_padding[1, :, 4:] = 123.0  # sample 1 has 4 valid tokens
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, "encoder_hidden_states": noisy_padding})
        shorter = model(**{**inputs, "encoder_attention_mask": inputs["encoder_attention_mask"].roll(-1, dims=1)})
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, shorter)


class CountSDPA(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("num_cond_latents", "per_block"), [(0, 2), (1, 3)])
def test_attention_runs_through_scaled_dot_product_attention(num_cond_latents, per_block):
    model, inputs = tiny_model().eval(), tiny_inputs()
    with torch.no_grad(), CountSDPA() as counter:
        model(**inputs, num_cond_latents=num_cond_latents)
    # self-attention (two calls when conditioning tokens are split off) + cross-attention, per block
    assert counter.calls == per_block * TINY_DIT_CONFIG["depth"]


def test_bfloat16_weights_keep_float32_output():
    model, inputs = tiny_model().to(torch.bfloat16).eval(), tiny_inputs()
    with torch.no_grad():
        out = model(**inputs, num_cond_latents=1)
        ref = tiny_model().eval()(**inputs, num_cond_latents=1)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"timestep": torch.zeros(2, 2)}, "timestep has shape [2, 2]; expected [2] or [2, 3]"),
        ({"num_cond_latents": 4}, "num_cond_latents=4 must be between 0 and the 3 latent frames"),
        ({"hidden_states": torch.zeros(2, 16, 3, 5, 6)}, "latent height 5 and width 6 must be divisible"),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(change, message):
    model = tiny_model().eval()
    with pytest.raises(ValueError) as excinfo, torch.no_grad():
        model(**{**tiny_inputs(), **change})
    assert message in str(excinfo.value)


def test_unsupported_released_options_are_refused():
    with pytest.raises(ValueError, match="cp_split_hw"):
        LongCatVideoTransformer3DModel(**{**TINY_DIT_CONFIG, "cp_split_hw": [2, 1]})


def test_without_zero_pad_padded_tokens_are_not_attended():
    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(**{**TINY_DIT_CONFIG, "text_tokens_zero_pad": False}).eval()
    inputs = tiny_inputs(batch=1)  # 6 tokens, all valid
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        masked = model(**{**inputs, "encoder_attention_mask": mask})
        cut = model(**{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, :, :4], "encoder_attention_mask": None})
    torch.testing.assert_close(masked, cut, atol=1e-5, rtol=0)
