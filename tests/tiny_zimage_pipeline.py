"""Reusable builder of a tiny random diffusers Z-Image pipeline folder (offline, seconds on a CPU).

``build_tiny_zimage_pipeline(path, seed=0)`` writes with ``save_pretrained`` the layout of a real Z-Image
pipeline (``model_index.json``, ``transformer/`` (ZImageTransformer2DModel), ``vae/`` (AutoencoderKL, FLUX's
scaling 0.3611 / shift 0.1159, factor 8), ``scheduler/`` (Z-Image-Turbo's: static shift 3),
``text_encoder/`` (Qwen3Model), ``tokenizer/`` (Qwen2Tokenizer with a Qwen3-style chat template)) such that
``diffusers.ZImagePipeline.from_pretrained(path)`` loads it. The tokenizer is a byte-level BPE built locally
over ``tiny_pipeline.WORDS`` (right padding with ``<|endoftext|>``, like Qwen's).
"""

from __future__ import annotations

import os
import pathlib

from tiny_pipeline import WORDS

TINY_ZIMAGE = {"text_width": 24, "latent_channels": 16, "vae_scale_factor": 8}
SCHEDULER_TURBO = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# the structure of Qwen3's chat template for one user turn + generation prompt (enable_thinking=True adds
# nothing; False adds an empty think block)
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def qwen_tokenizer():
    """A Qwen2Tokenizer over the byte-level alphabet with merges spelling every word of ``WORDS``."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for word in WORDS:
        cur = "\u0120" + word[0]  # byte-level "space + first letter"
        if ("\u0120", word[0]) not in merges:
            merges.append(("\u0120", word[0]))
        vocab.setdefault(cur, len(vocab))
        for ch in word[1:]:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def build_tiny_zimage_pipeline(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny random Z-Image pipeline to ``path`` and return it (deterministic given ``seed``)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer()
    w = TINY_ZIMAGE["text_width"]
    torch.manual_seed(seed * 1000 + 1)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=256,
        rope_theta=1e6, tie_word_embeddings=False, pad_token_id=tok.pad_token_id)).eval()
    torch.manual_seed(seed * 1000 + 2)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=TINY_ZIMAGE["latent_channels"], dim=32,
        n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=w, axes_dims=(4, 6, 6),
        axes_lens=(256, 32, 32)).eval()
    with torch.no_grad():
        for k, p in transformer.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if k.endswith(".weight") and p.ndim == 1
                    else 0.12 * torch.randn_like(p))
    torch.manual_seed(seed * 1000 + 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=TINY_ZIMAGE["latent_channels"], norm_num_groups=4, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_TURBO), vae=vae,
                          text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
