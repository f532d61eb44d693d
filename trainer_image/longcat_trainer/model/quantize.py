"""The frozen base's big matmul weights in 8 bits (SimpleTuner's base_model_precision), one scale per output row.

`fp8-torchao`: weights in float8 e4m3; on a GPU with FP8 tensor cores the matmuls themselves run in FP8
(`torch._scaled_mm` with per-row scales: activations and incoming gradients are quantized per token on the
fly), about twice the bf16 rate on Hopper, and the weights take half the memory. `int8-quanto`: weights in
int8, dequantized to the activation dtype inside each matmul: half the memory, bf16 speed and accuracy of the
activations. The names are SimpleTuner's; the implementation is ours (PyTorch's scaled matmul), because the
libraries behind those names either keep a bf16 master copy of frozen weights (torchao's float8 training)
or dequantize every FP8 matmul (weight-only configs), which gives up the speed.

Only the Linears inside the DiT blocks that take the token stream are quantized (attention, cross-attention,
feed-forward: 95 % of the parameters); the adaLN modulation, embedders and final layer stay in their dtype
because the official model computes them in float32. LoRA adapters wrap the quantized layers unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from longcat_job.failures import InvalidConfigError

FORMATS = {"fp8-torchao": torch.float8_e4m3fn, "int8-quanto": torch.int8}
QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                     "ffn.w1", "ffn.w2", "ffn.w3")


def _top(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max if dtype.is_floating_point else float(torch.iinfo(dtype).max)


def quantize_rows(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t [M, K] -> (q [M, K] in dtype, float32 scale [M, 1]) with t ~= q * scale, each row's amax at the top."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / _top(dtype)
    scaled = t.float() / scale
    if not dtype.is_floating_point:
        scaled = scaled.round()
    return scaled.clamp(-_top(dtype), _top(dtype)).to(dtype), scale


def fp8_matmuls_available(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class _QuantizedMatmul(torch.autograd.Function):
    """x @ (q * scale).T with the base frozen: backward returns the input's gradient only and keeps no
    dequantized copy of the weight (a saved bf16 weight would give back the memory the format saves)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, fp8: bool) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        ctx.fp8 = fp8
        x2 = x.reshape(-1, x.shape[-1])
        if fp8:
            xq, x_scale = quantize_rows(x2, q.dtype)
            out = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=scale.t(), out_dtype=x.dtype)
        else:
            out = x2 @ (q.to(x.dtype) * scale.to(x.dtype)).t()
        return out.view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.fp8:
            # dX = (g * scale_rows) @ q: the weight's row scales fold into the gradient's columns, so the
            # second operand needs only a unit scale; _scaled_mm wants it column-major, hence the transpose copy.
            gq, g_scale = quantize_rows(g2 * scale.t(), q.dtype)
            ones = torch.ones(1, q.shape[1], device=q.device, dtype=torch.float32)
            dx = torch._scaled_mm(gq, q.t().contiguous().t(), scale_a=g_scale, scale_b=ones, out_dtype=grad.dtype)
        else:
            dx = g2 @ (q.to(grad.dtype) * scale.to(grad.dtype))
        return dx.view(*grad.shape[:-1], q.shape[1]), None, None, None


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored in 8 bits with one float32 scale per output row."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, fp8_matmuls: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight.detach(), dtype)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.fp8_matmuls = fp8_matmuls and dtype == torch.float8_e4m3fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _QuantizedMatmul.apply(x, self.weight_q, self.weight_scale, self.fp8_matmuls)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self.weight_q.dtype}, fp8_matmuls={self.fp8_matmuls}")


def quantize_base(model: nn.Module, fmt: str) -> int:
    """Replace the blocks' frozen token Linears (inside LoRA wrappers too) in place; returns how many.

    One layer at a time, so the peak is the bf16 model plus one layer.
    """
    if fmt not in FORMATS:
        raise InvalidConfigError(f"spec.training.baseQuantization: {fmt!r} is not one of {sorted(FORMATS)}")
    dtype = FORMATS[fmt]
    count = 0
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and _is_quantized(name)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if module.weight.requires_grad:
            raise ValueError(f"{name}: only frozen weights can be quantized (LoRA trains adapters, not the base)")
        fp8 = fp8_matmuls_available(module.weight.device)
        setattr(parent, child, QuantizedLinear(module, dtype, fp8))
        count += 1
    return count


def _is_quantized(name: str) -> bool:
    """`blocks.3.attn.qkv` or, under a LoRA wrapper, `blocks.3.attn.qkv.base_layer`."""
    path = name.removesuffix(".base_layer")
    return path.startswith("blocks.") and path.split(".", 2)[-1] in QUANTIZED_LINEARS
