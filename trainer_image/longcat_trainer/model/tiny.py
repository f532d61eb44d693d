"""A tiny random LongCat-Video checkpoint in the official layout, for tests and CPU demos.

Same classes as the released model (our DiT, diffusers' AutoencoderKLWan and FlowMatchEulerDiscreteScheduler,
transformers' UMT5EncoderModel and T5 tokenizer) at sizes that run in seconds on a CPU. Everything is built
offline: the tokenizer is a small unigram vocabulary, not a download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from longcat_job.model_source import CFG_STEP_LORA

from .. import official_lora

from .dit import LongCatVideoTransformer3DModel

TEXT_WIDTH = 32  # UMT5 d_model == the DiT's caption_channels, as 4096 == 4096 in the release
LATENT_CHANNELS = 16

TINY_DIT_CONFIG = {
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 2,
    "caption_channels": TEXT_WIDTH,
    "mlp_ratio": 4,
    "adaln_tembed_dim": 32,
    "frequency_embedding_size": 32,
    "patch_size": [1, 2, 2],
    "cp_split_hw": [1, 1],
    "text_tokens_zero_pad": True,
}

TINY_VAE_CONFIG = {
    "base_dim": 8,
    "z_dim": LATENT_CHANNELS,
    "dim_mult": [1, 2, 4, 4],  # three downsamples: 8x spatial
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],  # two of them temporal: 4x
    "latents_mean": [0.1 * (i - 8) for i in range(LATENT_CHANNELS)],
    "latents_std": [1.0 + 0.1 * i for i in range(LATENT_CHANNELS)],
}

TINY_TEXT_CONFIG = {
    "d_model": TEXT_WIDTH,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
}

# A handful of words plus single letters, so that any lowercase ASCII caption tokenizes without <unk>.
_WORDS = "a the cat dog runs walks in on park city street woman man sits table window red blue car".split()
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -3.0) for word in _WORDS]
    vocab += [(letter, -6.0) for letter in _LETTERS] + [(f"▁{letter}", -7.0) for letter in _LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def write_tiny_checkpoint(root: Path, *, seed: int = 0, dit_max_shard_size: str | None = None) -> Path:
    """Write dit/ vae/ text_encoder/ tokenizer/ scheduler/ and lora/cfg_step_lora.safetensors under root with random weights; returns root.

    dit_max_shard_size (e.g. "100KB") splits the DiT into several safetensors shards with an index, as released.
    """
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT_CONFIG)).save_pretrained(root / "text_encoder")
    AutoencoderKLWan(**TINY_VAE_CONFIG).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0).save_pretrained(root / "scheduler")
    dit = LongCatVideoTransformer3DModel(**TINY_DIT_CONFIG)
    save_kwargs = {} if dit_max_shard_size is None else {"max_shard_size": dit_max_shard_size}
    dit.save_pretrained(root / "dit", **save_kwargs)
    # The released checkpoint's distillation LoRA, in its format (rank 128, alpha 64 there; tiny here).
    (root / CFG_STEP_LORA).parent.mkdir(exist_ok=True)
    save_file(official_lora.synthetic_state(dit, ["qkv", "proj", "q_linear", "kv_linear"], rank=4, alpha=2.0),
              str(root / CFG_STEP_LORA))
    return root
