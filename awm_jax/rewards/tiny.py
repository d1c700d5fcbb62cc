"""Tiny random reward models saved to a folder, for tests and benchmarks (no download).

``save_tiny_clip`` writes a random ``CLIPModel`` + ``CLIPProcessor`` (byte-level vocabulary, no
merges), ``save_tiny_aesthetic`` a random LAION-aesthetic MLP head, ``save_tiny_detr`` a random
``DetrForObjectDetection`` (ResNet backbone built from config, no timm, no download) with an
image processor. These are plumbing fixtures: the weights mean nothing.
"""

from __future__ import annotations

import os

COCO_LIKE = ("person", "dog", "cat", "car", "cup", "bowl", "wine glass", "stop sign")


def _byte_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of single byte-level characters (with and without ``</w>``)."""
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra, n = [], 0
    for b in range(256):
        if b not in chars:
            extra.append(256 + n)
            n += 1
    table = [chr(c) for c in chars + extra]
    vocab: dict[str, int] = {}
    for ch in table:
        vocab[ch] = len(vocab)
    for ch in table:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def save_tiny_clip(path: str, hidden: int = 32, proj: int = 16, image_size: int = 32, layers: int = 2,
                   heads: int = 2, intermediate: int = 64, patch: int = 8, seed: int = 0) -> str:
    """Save a random CLIP model + processor to ``path``; returns ``path``.

    Defaults are tiny; pass CLIP-L-like sizes (hidden 1024/768, 24/12 layers, 224 px) for
    full-width benchmarks.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    vocab = _byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77
    improc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=improc, tokenizer=tok).save_pretrained(path)
    text_cfg = dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate,
                    num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                    bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                    pad_token_id=vocab["<|endoftext|>"])
    vision_cfg = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, image_size=image_size, patch_size=patch)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=proj)
    CLIPModel(cfg).eval().save_pretrained(path)
    return path


def save_tiny_aesthetic(path: str, dim: int = 16, seed: int = 0) -> str:
    """Save a random aesthetic MLP head (input ``dim``) as safetensors at ``path``; returns it."""
    import torch

    from awm_jax.rewards.aesthetic import head_class

    torch.manual_seed(seed)
    head = head_class()(dim)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, path)
    return path


def save_tiny_detr(path: str, class_names=COCO_LIKE, queries: int = 10, d_model: int = 32,
                   image_size: int = 64, seed: int = 0) -> str:
    """Save a random tiny ``DetrForObjectDetection`` + image processor to ``path``; returns it."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    os.makedirs(path, exist_ok=True)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage4"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                     num_queries=queries, d_model=d_model, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                     decoder_ffn_dim=32, num_labels=len(class_names),
                     id2label=dict(enumerate(class_names)),
                     label2id={c: i for i, c in enumerate(class_names)})
    torch.manual_seed(seed)
    DetrForObjectDetection(cfg).eval().save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size}).save_pretrained(path)
    return path


def save_tiny_mask2former(path: str, class_names=COCO_LIKE, queries: int = 8, image_size: int = 64,
                          seed: int = 0) -> str:
    """Save a random tiny ``Mask2FormerForUniversalSegmentation`` (Swin backbone) + processor."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    os.makedirs(path, exist_ok=True)
    swin = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                      num_heads=[1, 1, 1, 1], window_size=4,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, use_pretrained_backbone=False, feature_size=32,
                            mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
                            dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            num_queries=queries, num_labels=len(class_names), common_stride=4,
                            id2label=dict(enumerate(class_names)),
                            label2id={c: i for i, c in enumerate(class_names)})
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(cfg).eval().save_pretrained(path)
    size = {"shortest_edge": image_size, "longest_edge": image_size}
    Mask2FormerImageProcessor(size=size).save_pretrained(path)
    return path
