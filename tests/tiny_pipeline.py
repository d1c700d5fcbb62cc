"""Reusable builder of a tiny random diffusers SD3 pipeline folder (offline, seconds on a CPU).

``build_tiny_sd3_pipeline(path, seed=0)`` writes, with ``save_pretrained``, the folder layout of a
real SD3 / SD3.5 pipeline (``model_index.json``, ``transformer/``, ``vae/``, ``scheduler/``,
``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``) such that
``StableDiffusion3Pipeline.from_pretrained(path)`` loads it.

Everything is built locally: the CLIP tokenizers from a byte-level BPE vocabulary + merges written
here (``tokenizer_2`` pads with ``"!"`` like SD3's CLIP-G tokenizer), the T5 tokenizer from a Unigram
model trained in-process with ``tokenizers`` on a small corpus. Sizes (``TINY``): CLIP-L width 16,
CLIP-G width 24 (pooled 16 + 24 = 40), T5 width 48 = ``joint_attention_dim`` (so the CLIP block is
zero-padded as in the real model), MMDiT 2 layers (layer 0 dual-attention, RMS qk-norm, like SD3.5),
VAE with 16 latent channels and no quant convs (SD3 style), flow-matching Euler scheduler (shift 3).
"""

from __future__ import annotations

import os
import pathlib

# Sizes other tests may rely on (do not change silently).
TINY = {
    "clip_l_width": 16,
    "clip_g_width": 24,
    "t5_width": 48,
    "pooled_dim": 40,
    "clip_max_length": 77,
    "latent_channels": 16,
    "vae_scale_factor": 2,
    "sample_size": 8,
}

WORDS = (
    "a an the of and with on in at to is are photo picture painting image sign says text word letters "
    "cat dog bird horse car bus truck boat chair table cup clock apple banana pizza cake red blue green "
    "yellow black white orange purple pink brown one two three four five left right above below next big "
    "small old new happy sunny street city forest beach mountain river sky night morning hello world"
).split()


def _clip_tokenizer(pad_token: str):
    """CLIP BPE tokenizer over the byte-level alphabet, with merges spelling every word of ``WORDS``."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab[tok] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = list(word)
        pieces[-1] += "</w>"
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=TINY["clip_max_length"],
    )


def _t5_tokenizer():
    """T5 tokenizer from a Unigram model trained in-process on sentences made of ``WORDS``."""
    import json
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    rng = random.Random(1234)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=160, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.75
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Scores rounded: the trainer's float sums are not bit-reproducible run to run.
    pieces = [(p, round(float(s), 3)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    if [p for p, _ in pieces[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise RuntimeError(f"unexpected special-token order in the trained Unigram vocab: {pieces[:3]}")
    return T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=512)


def build_tiny_sd3_pipeline(path: str | os.PathLike, seed: int = 0, *, with_t5: bool = True) -> pathlib.Path:
    """Write a tiny random SD3 pipeline to ``path`` (created if needed) and return it as a Path.

    Deterministic given ``seed``. Load with ``StableDiffusion3Pipeline.from_pretrained(path)``.
    ``with_t5=False`` writes ``text_encoder_3``/``tokenizer_3`` as null (diffusers then uses zeros for
    the T5 block; it needs ``from_pretrained(path, text_encoder_3=None, tokenizer_3=None)`` for such a
    folder). Sizes: see ``TINY``.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_l, tok_g = _clip_tokenizer("<|endoftext|>"), _clip_tokenizer("!")
    tok_t5 = _t5_tokenizer()

    def clip(width: int, act: str, k: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed * 1000 + k)
        cfg = CLIPTextConfig(
            vocab_size=len(tok_l), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=TINY["clip_max_length"],
            hidden_act=act, layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1,
            eos_token_id=2,  # legacy value of the real SD3 configs: pooled token = argmax(input_ids) (EOS)
        )
        return CLIPTextModelWithProjection(cfg).eval()

    text_encoder = clip(TINY["clip_l_width"], "quick_gelu", 1)
    text_encoder_2 = clip(TINY["clip_g_width"], "gelu", 2)
    torch.manual_seed(seed * 1000 + 3)
    t5_cfg = T5Config(
        vocab_size=(len(tok_t5) + 63) // 64 * 64, d_model=TINY["t5_width"], d_kv=8, num_heads=4, d_ff=64,
        num_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    text_encoder_3 = T5EncoderModel(t5_cfg).eval()
    torch.manual_seed(seed * 1000 + 4)
    transformer = SD3Transformer2DModel(
        sample_size=TINY["sample_size"], patch_size=2, in_channels=TINY["latent_channels"], num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TINY["t5_width"],
        caption_projection_dim=16, pooled_projection_dim=TINY["pooled_dim"],
        out_channels=TINY["latent_channels"], pos_embed_max_size=16, dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    torch.manual_seed(seed * 1000 + 5)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=TINY["latent_channels"], norm_num_groups=4, sample_size=16,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tok_l, text_encoder_2=text_encoder_2, tokenizer_2=tok_g,
        text_encoder_3=text_encoder_3 if with_t5 else None, tokenizer_3=tok_t5 if with_t5 else None,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
