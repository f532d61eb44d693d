"""The LongCat-Video diffusion transformer (DiT), written for this project.

Module and parameter names follow the released `dit/` checkpoint of `meituan-longcat/LongCat-Video`, so its
config.json and safetensors load through `from_pretrained(..., subfolder="dit")` with no key mapping.
Numerics follow the official model: timestep embedding, adaLN modulation, residual gates and the final
projection run in float32 whatever the weight dtype; RMS-normed q/k; 3-D RoPE on interleaved pairs.

Shapes: latents [B, C, T, H, W]; tokens are ordered (t, h, w) after the (1, 2, 2) patch embedding, so
N = T * (H/2) * (W/2) and one latent frame is S = N / T consecutive tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    apply_rotary_emb,
    get_1d_rotary_pos_embed,
    get_timestep_embedding,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm, RMSNorm
from torch import nn

from longcat_job.failures import InvalidConfigError

from .context_parallel import ContextParallel

NORM_EPS = 1e-6
ROPE_THETA = 10000.0
FFN_MULTIPLE_OF = 256


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in float32 whatever the weight dtype (the official model wraps these in fp32 autocast)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def modulate_fp32(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: norm(x) * (1 + scale) + shift in float32, cast back to x's dtype. x [B, T, S, C], shift/scale [B, T, 1, C]."""
    return (norm(x.float()) * (1 + scale) + shift).to(x.dtype)


@functools.lru_cache(maxsize=16)
def rope_3d(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T*H*W, head_dim] of the 3-D rotary embedding of a (T, H, W) token grid.

    The head dim is split t | h | w with h and w getting 2*(head_dim//6) each and t the rest; each part is a
    1-D RoPE over that axis's integer positions, repeated on interleaved pairs.
    """
    dim_hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * dim_hw, dim_hw, dim_hw)
    parts = [
        get_1d_rotary_pos_embed(dim, torch.arange(size, dtype=torch.float32), theta=ROPE_THETA, use_real=True)
        for dim, size in zip(dims, grid, strict=True)
    ]
    num_t, num_h, num_w = grid

    def broadcast(index: int, tensor: torch.Tensor) -> torch.Tensor:
        shape = [1, 1, 1, tensor.shape[-1]]
        shape[index] = tensor.shape[0]
        return tensor.view(shape).expand(num_t, num_h, num_w, -1)

    cos = torch.cat([broadcast(i, part[0]) for i, part in enumerate(parts)], dim=-1).reshape(-1, head_dim)
    sin = torch.cat([broadcast(i, part[1]) for i, part in enumerate(parts)], dim=-1).reshape(-1, head_dim)
    return cos.to(device), sin.to(device)


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, T, H, W] -> [B, N, C]


class TimestepEmbedder(nn.Module):
    def __init__(self, t_embed_dim: int, frequency_embedding_size: int):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, t_embed_dim),
            nn.SiLU(),
            nn.Linear(t_embed_dim, t_embed_dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [M] -> float32 [M, t_embed_dim]; sinusoid in (cos, sin) order."""
        freq = get_timestep_embedding(t, self.frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        return linear_fp32(self.mlp[2], F.silu(linear_fp32(self.mlp[0], freq)))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class FeedForwardSwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int):
        super().__init__()
        # LLaMA sizing: 2/3 of dim*mlp_ratio, rounded up to a multiple of 256 (4096 -> 11008).
        hidden = int(2 * dim * mlp_ratio / 3)
        hidden = FFN_MULTIPLE_OF * math.ceil(hidden / FFN_MULTIPLE_OF)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class CondKV:
    """One block's self-attention keys and values [1, heads, c, head_dim] of the conditioning tokens.

    Conditioning tokens attend only among themselves, have timestep 0 and get no cross-attention, so their
    states depend on nothing but the start frame: a sampler records these once (`conditioning_cache`) and
    then runs only the noisy tokens, which attend to the recorded keys and values plus their own.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class Attention(nn.Module):
    """Self-attention over all video tokens, with the image-to-video rule for conditioning frames."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps=NORM_EPS)
        self.k_norm = RMSNorm(self.head_dim, eps=NORM_EPS)
        self.proj = nn.Linear(dim, dim)
        self.context_parallel: ContextParallel | None = None  # set by context_parallel.enable

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], num_cond_tokens: int, cond_kv: CondKV | None = None
    ) -> torch.Tensor:
        """cond_kv: empty -> record the conditioning tokens' k, v into it; filled -> x holds only noisy tokens.

        Under context parallelism x is this rank's shard; q, k, v are exchanged for all tokens of this rank's
        heads, so the rule for conditioning tokens and the RoPE positions below see the whole sequence.
        """
        B, n, C = x.shape
        cp = self.context_parallel
        qkv = self.qkv(x).view(B, n, 3, self.num_heads, self.head_dim)
        if cp is not None:
            qkv = cp.sequence_to_heads(qkv)
        N = qkv.shape[1]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = apply_rotary_emb(self.q_norm(q), rope)
        k = apply_rotary_emb(self.k_norm(k), rope)
        if cond_kv is not None and cond_kv.k is not None:
            k = torch.cat([cond_kv.k.expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([cond_kv.v.expand(B, -1, -1, -1), v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v)
        elif num_cond_tokens > 0:
            # Conditioning tokens see only each other (they stay a clean encoding of the start frame);
            # noisy tokens see everything. Two dense calls keep the fast kernels that a mask would rule out.
            c = num_cond_tokens
            if cond_kv is not None:
                cond_kv.k, cond_kv.v = k[:, :, :c], v[:, :, :c]
            out = F.scaled_dot_product_attention(q[:, :, :c], k[:, :, :c], v[:, :, :c])
            if c < N:
                out = torch.cat([out, F.scaled_dot_product_attention(q[:, :, c:], k, v)], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        if cp is not None:
            return self.proj(cp.heads_to_sequence(out))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MultiHeadCrossAttention(nn.Module):
    """Video tokens attend to the caption tokens of their own sample."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim, eps=NORM_EPS)
        self.k_norm = RMSNorm(self.head_dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, N, C], y [B, M, C], y_mask bool [B, M] (None: attend to all M tokens)."""
        B, N, C = x.shape
        M = y.shape[1]
        q = self.q_norm(self.q_linear(x).view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, M, 2, self.num_heads, self.head_dim).unbind(2)
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        attn_mask = None if y_mask is None else y_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class LongCatSingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int, adaln_tembed_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 6 * hidden_size))
        self.mod_norm_attn = FP32LayerNorm(hidden_size, eps=NORM_EPS, elementwise_affine=False)
        self.mod_norm_ffn = FP32LayerNorm(hidden_size, eps=NORM_EPS, elementwise_affine=False)
        self.pre_crs_attn_norm = FP32LayerNorm(hidden_size, eps=NORM_EPS, elementwise_affine=True)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.ffn = FeedForwardSwiGLU(hidden_size, mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor | None,
        t_emb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        num_cond_tokens: int,
        cond_kv: CondKV | None = None,
    ) -> torch.Tensor:
        """x [B, N, C] in the model dtype; t_emb float32 [B, T, C_t], one modulation per latent frame.

        Under context parallelism x and t_emb are this rank's frames; num_cond_tokens counts the whole sequence.
        """
        B, N, C = x.shape
        T = t_emb.shape[1]
        dtype = x.dtype
        modulation = linear_fp32(self.adaLN_modulation[1], F.silu(t_emb)).unsqueeze(2)  # [B, T, 1, 6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)

        def per_frame(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(B, T, N // T, C)

        h = modulate_fp32(self.mod_norm_attn, per_frame(x), shift_msa, scale_msa).view(B, N, C)
        x = (per_frame(x) + gate_msa * per_frame(self.attn(h, rope, num_cond_tokens, cond_kv))).view(B, N, C).to(dtype)

        # Conditioning tokens get no cross-attention (zeros added); they lead the sequence, so on rank 0.
        cp = self.attn.context_parallel
        c = num_cond_tokens if cp is None else cp.local_prefix(num_cond_tokens, N)
        if c < N:
            cross = self.cross_attn(self.pre_crs_attn_norm(x[:, c:]), y, y_mask)
            x = torch.cat([x[:, :c], x[:, c:] + cross], dim=1) if c > 0 else x + cross

        h = modulate_fp32(self.mod_norm_ffn, per_frame(x), shift_mlp, scale_mlp).view(B, N, C)
        return (per_frame(x) + gate_mlp * per_frame(self.ffn(h))).view(B, N, C).to(dtype)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, adaln_tembed_dim: int):
        super().__init__()
        self.norm_final = FP32LayerNorm(hidden_size, eps=NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 2 * hidden_size))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        T = t_emb.shape[1]
        shift, scale = linear_fp32(self.adaLN_modulation[1], F.silu(t_emb)).unsqueeze(2).chunk(2, dim=-1)
        x = modulate_fp32(self.norm_final, x.view(B, T, N // T, C), shift, scale).view(B, N, C)
        return linear_fp32(self.linear, x)


class LongCatVideoTransformer3DModel(ModelMixin, ConfigMixin):
    """LongCat-Video DiT. `forward` maps noisy latents to the flow-matching velocity prediction (float32)."""

    # Activation checkpointing is applied per block from outside (model/recompute.py), not by diffusers.
    _supports_gradient_checkpointing = False
    _no_split_modules = ["LongCatSingleStreamBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        hidden_size: int = 4096,
        depth: int = 48,
        num_heads: int = 32,
        caption_channels: int = 4096,
        mlp_ratio: int = 4,
        adaln_tembed_dim: int = 512,
        frequency_embedding_size: int = 256,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        # Attention backends of the official code: here scaled_dot_product_attention chooses the kernel,
        # so these released config keys are accepted and have no effect.
        enable_flashattn3: bool = False,
        enable_flashattn2: bool = False,
        enable_xformers: bool = False,
        enable_bsa: bool = False,
        bsa_params: dict | None = None,
        cp_split_hw: list[int] | None = None,
        text_tokens_zero_pad: bool = False,
    ) -> None:
        super().__init__()
        if enable_bsa:
            raise InvalidConfigError("enable_bsa: block-sparse attention is not implemented here; set it to false in config.json")
        if cp_split_hw is not None and math.prod(cp_split_hw) != 1:
            raise InvalidConfigError(f"cp_split_hw={cp_split_hw}: context parallelism is not implemented here; use [1, 1]")
        if hidden_size % num_heads:
            raise InvalidConfigError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if tuple(patch_size)[0] != 1:
            raise InvalidConfigError(f"patch_size {patch_size}: the temporal patch must be 1, as in the released model")
        self.patch_size = tuple(patch_size)
        self.out_channels = out_channels
        self.head_dim = hidden_size // num_heads
        self.text_tokens_zero_pad = text_tokens_zero_pad

        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(adaln_tembed_dim, frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(
            LongCatSingleStreamBlock(hidden_size, num_heads, mlp_ratio, adaln_tembed_dim) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), out_channels, adaln_tembed_dim)
        self.context_parallel: ContextParallel | None = None  # set by context_parallel.enable

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
        cond_cache: list[CondKV] | None = None,
    ) -> torch.Tensor:
        """Velocity prediction, float32 [B, C_out, T, H, W].

        hidden_states: latents [B, C, T, H, W] (H and W divisible by the patch size).
        timestep: [B] (one per sample) or [B, T] (one per latent frame), in the scheduler's 0..1000 scale.
        encoder_hidden_states: text states [B, 1, M, caption_channels] (or [B, M, caption_channels]).
        encoder_attention_mask: [B, M], nonzero for real tokens.
        num_cond_latents: leading latent frames that are clean conditioning (image-to-video: 1).
        cond_cache: from `conditioning_cache`; then hidden_states and timestep hold only the frames after the
            conditioning ones (num_cond_latents must be 0), and so does the output. (An empty list of
            CondKV is filled in instead: that is how `conditioning_cache` records it.)
        """
        B, _, T, H, W = hidden_states.shape
        _, p_h, p_w = self.patch_size
        if H % p_h or W % p_w:
            raise ValueError(f"latent height {H} and width {W} must be divisible by the patch size {p_h}x{p_w}")
        if not 0 <= num_cond_latents <= T:
            raise ValueError(f"num_cond_latents={num_cond_latents} must be between 0 and the {T} latent frames")
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(-1, T)
        if tuple(timestep.shape) != (B, T):
            raise ValueError(f"timestep has shape {list(timestep.shape)}; expected [{B}] or [{B}, {T}]")
        if encoder_hidden_states.ndim == 4:
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        grid = (T, H // p_h, W // p_w)
        tokens_per_frame = grid[1] * grid[2]
        # Cached conditioning frames sit before these frames: RoPE positions start after them.
        cached_tokens = 0
        if cond_cache is not None:
            if len(cond_cache) != len(self.blocks):
                raise ValueError(f"cond_cache has {len(cond_cache)} entries for {len(self.blocks)} blocks")
            if cond_cache[0].k is None:  # empty: conditioning_cache() is recording into it
                if num_cond_latents != T:
                    raise ValueError("recording a cond_cache needs conditioning frames only (num_cond_latents=T)")
            elif num_cond_latents:
                raise ValueError("with cond_cache the hidden states hold only noisy frames: pass num_cond_latents=0")
            else:
                cached_tokens = cond_cache[0].k.shape[2]
            if cached_tokens % tokens_per_frame:
                raise ValueError(f"cond_cache holds {cached_tokens} tokens, not whole frames of {tokens_per_frame}")

        dtype = self.x_embedder.proj.weight.dtype
        x = self.x_embedder(hidden_states.to(dtype))
        # The official model rounds timesteps to the weight dtype before embedding them in float32; kept so
        # that bf16 training sees the timesteps the released model was trained with.
        t_emb = self.t_embedder(timestep.to(dtype).float().flatten()).view(B, T, -1)
        y = self.y_embedder(encoder_hidden_states.to(dtype))
        y_mask = None
        if encoder_attention_mask is not None:
            if self.text_tokens_zero_pad:
                # Released behaviour: padded tokens are zeroed after projection and still attended to.
                y = y * encoder_attention_mask[:, :, None].to(y.dtype)
            else:
                y_mask = encoder_attention_mask.bool()
        full_grid = (T + cached_tokens // tokens_per_frame, *grid[1:])
        rope = tuple(part[cached_tokens:] for part in rope_3d(full_grid, self.head_dim, x.device))
        num_cond_tokens = num_cond_latents * tokens_per_frame
        caches = cond_cache if cond_cache is not None else [None] * len(self.blocks)
        cp = self.context_parallel
        if cp is not None:
            if cond_cache is not None:
                raise ValueError("context parallelism runs the whole clip: sample without a cond_cache")
            # This rank's whole latent frames (see context_parallel.py); RoPE stays whole, attention sees all.
            frames = cp.local_frames(T)
            x = x.view(B, T, tokens_per_frame, -1)[:, frames].flatten(1, 2)
            t_emb = t_emb[:, frames]

        for block, cond_kv in zip(self.blocks, caches, strict=True):
            x = block(x, y, y_mask, t_emb, rope, num_cond_tokens, cond_kv)

        x = self.final_layer(x, t_emb)
        if cp is not None:
            x = cp.gather_sequence(x)
        return self.unpatchify(x, grid)

    @torch.no_grad()
    def conditioning_cache(self, cond_latents: torch.Tensor) -> list[CondKV]:
        """Every block's keys and values of clean conditioning latents [1, C, T_c, H, W] (timestep 0).

        One pass over the conditioning frames alone: they attend only among themselves and skip
        cross-attention, so no text is needed (a zero caption stands in for the unused input).
        """
        if cond_latents.shape[0] != 1:
            raise ValueError(f"conditioning_cache takes one sample; got a batch of {cond_latents.shape[0]}")
        T = cond_latents.shape[2]
        caches = [CondKV() for _ in self.blocks]
        dtype = self.x_embedder.proj.weight.dtype
        caption = torch.zeros(1, 1, self.config.caption_channels, device=cond_latents.device, dtype=dtype)
        timestep = torch.zeros(1, T, device=cond_latents.device)
        self(cond_latents, timestep, caption, num_cond_latents=T, cond_cache=caches)
        return caches

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, N, p_t*p_h*p_w*C_out] -> [B, C_out, T*p_t, H*p_h, W*p_w]; tokens (t, h, w), channels (p_t, p_h, p_w, C)."""
        B = x.shape[0]
        n_t, n_h, n_w = grid
        p_t, p_h, p_w = self.patch_size
        x = x.view(B, n_t, n_h, n_w, p_t, p_h, p_w, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, self.out_channels, n_t * p_t, n_h * p_h, n_w * p_w).float()
