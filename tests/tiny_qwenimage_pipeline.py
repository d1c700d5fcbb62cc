"""Builder of a tiny random diffusers Qwen-Image pipeline folder (offline, seconds on a CPU).

``build_tiny_qwenimage_pipeline(path, seed=0)`` writes with ``save_pretrained`` the layout of a real
Qwen-Image pipeline: ``transformer/`` (QwenImageTransformer2DModel), ``vae/`` (AutoencoderKLQwenImage,
factor 8), ``scheduler/`` (Qwen-Image's FlowMatchEulerDiscreteScheduler settings: dynamic exponential shift
over 256..8192 tokens, shifts 0.5..0.9, shift_terminal 0.02), ``text_encoder/``
(Qwen2_5_VLForConditionalGeneration) and ``tokenizer/`` (a Qwen2Tokenizer: byte-level BPE with merges
spelling ``tiny_pipeline.WORDS`` and the chat special tokens), so that
``diffusers.QwenImagePipeline.from_pretrained(path)`` loads it.
"""

from __future__ import annotations

import os
import pathlib

from tiny_pipeline import WORDS

TEXT_WIDTH = 24
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
TRANSFORMER = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TEXT_WIDTH,
    axes_dims_rope=(4, 6, 6),
)
VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.05],
    latents_std=[1.5, 0.7, 2.0, 1.1],
)


def qwen2_tokenizer():
    """A small Qwen2Tokenizer (byte-level BPE over WORDS, ``<|endoftext|>`` padding on the right)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in WORDS:
        cur = "\u0120" + word[0]
        if ("\u0120", word[0]) not in merges:
            merges.append(("\u0120", word[0]))
        vocab.setdefault(cur, len(vocab))
        for ch in word[1:]:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.padding_side = "right"
    return tok


def build_tiny_qwenimage_pipeline(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny random Qwen-Image pipeline to ``path`` and return it (deterministic given ``seed``)."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = qwen2_tokenizer()
    vocab = (len(tok) + 63) // 64 * 64
    torch.manual_seed(seed * 1000 + 1)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=TEXT_WIDTH,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=TEXT_WIDTH,
            fullatt_block_indexes=[0],
        ),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    torch.manual_seed(seed * 1000 + 2)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER).eval()
    with torch.no_grad():
        for k, p in transformer.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p)
                if k.endswith(".weight") and p.ndim == 1
                else 0.15 * torch.randn_like(p)
            )
    torch.manual_seed(seed * 1000 + 3)
    vae = AutoencoderKLQwenImage(**VAE).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
