"""Reusable builder of a tiny random diffusers FLUX.1 pipeline folder (offline, seconds on a CPU).

``build_tiny_flux_pipeline(path, seed=0, guidance_embeds=True)`` writes, with ``save_pretrained``, the folder
layout of a real FLUX.1 pipeline (``model_index.json``, ``transformer/``, ``vae/``, ``scheduler/``,
``text_encoder/`` (CLIPTextModel), ``tokenizer/``, ``text_encoder_2/`` (T5EncoderModel), ``tokenizer_2/``)
such that ``diffusers.FluxPipeline.from_pretrained(path)`` loads it. ``guidance_embeds=False`` gives a
FLUX.1-schnell-like pipeline: no guidance embedding and schnell's static-shift scheduler (shift 1).

Tokenizers come from ``tiny_pipeline`` (built locally). Sizes (``TINY_FLUX``): CLIP-L width 16 (FLUX uses
its ``pooler_output``, so ``pooled_projection_dim`` = 16), T5 width 48 = ``joint_attention_dim``,
transformer 1 double + 2 single blocks (2 heads of 16, rope axes (4, 6, 6)), ``in_channels`` 64 (16 latent
channels packed 2x2). The VAE has 4 blocks, so its factor is 8 like FLUX's (diffusers' FluxPipeline reads
``2 ** (len(block_out_channels) - 1)``; the FLUX family assumes 8), 16 latent channels, no quant convs,
FLUX's scaling 0.3611 / shift 0.1159. Scheduler: FLUX.1-dev's flow-matching Euler with dynamic shifting,
or FLUX.1-schnell's (``use_dynamic_shifting=False``, ``shift=1``).
Transformer weights are re-drawn (0.2 N(0, 1), RMS-norm scales 1 + 0.2 N(0, 1)) so outputs are not tiny.
"""

from __future__ import annotations

import os
import pathlib

from tiny_pipeline import _clip_tokenizer, _t5_tokenizer

# Sizes other tests may rely on (do not change silently).
TINY_FLUX = {
    "clip_width": 16,
    "t5_width": 48,
    "clip_max_length": 77,
    "latent_channels": 16,
    "vae_scale_factor": 8,
}

# the scheduler_config.json values of FLUX.1-dev and FLUX.1-schnell
SCHEDULER_DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHEDULER_SCHNELL = dict(SCHEDULER_DEV, shift=1.0, use_dynamic_shifting=False)


def build_tiny_flux_pipeline(path: str | os.PathLike, seed: int = 0,
                             guidance_embeds: bool = True) -> pathlib.Path:
    """Write a tiny random FLUX pipeline to ``path`` (created if needed) and return it as a Path.

    Deterministic given ``seed``. Load with ``diffusers.FluxPipeline.from_pretrained(path)``.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_clip = _clip_tokenizer("<|endoftext|>")
    tok_t5 = _t5_tokenizer()

    torch.manual_seed(seed * 1000 + 1)
    w = TINY_FLUX["clip_width"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok_clip), hidden_size=w, intermediate_size=2 * w, projection_dim=w,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_FLUX["clip_max_length"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1,
        eos_token_id=2,  # legacy value of the real configs: pooled token = argmax(input_ids) (EOS)
    )).eval()
    torch.manual_seed(seed * 1000 + 2)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=(len(tok_t5) + 63) // 64 * 64, d_model=TINY_FLUX["t5_width"], d_kv=8, num_heads=4, d_ff=64,
        num_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    torch.manual_seed(seed * 1000 + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * TINY_FLUX["latent_channels"], num_layers=1, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TINY_FLUX["t5_width"],
        pooled_projection_dim=w, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():
        for k, p in transformer.named_parameters():
            if k.endswith(".weight") and p.ndim == 1:  # RMSNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    torch.manual_seed(seed * 1000 + 4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=TINY_FLUX["latent_channels"], norm_num_groups=4, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(
            **(SCHEDULER_DEV if guidance_embeds else SCHEDULER_SCHNELL)), vae=vae,
        text_encoder=text_encoder, tokenizer=tok_clip, text_encoder_2=text_encoder_2, tokenizer_2=tok_t5,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
