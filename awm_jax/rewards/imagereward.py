"""ImageReward (Xu et al. 2023, THUDM/ImageReward): BLIP ViT-L/16 image tokens, a BERT text encoder that
cross-attends to them, an MLP on the text [CLS] state, normalised by the training reward's mean and std.

Why not the ``image-reward`` package: its ``load`` always fetches ``med_config.json`` through
``hf_hub_download`` and its BLIP builds the tokenizer with
``BertTokenizer.from_pretrained("bert-base-uncased")`` (THUDM/ImageReward ImageReward/utils.py ``load``;
train/src/models/blip.py ``init_tokenizer``), so it does not load from a local folder offline, and it pins
timm / fairscale. This module builds the same network from ``transformers`` BLIP components and reads the
published checkpoint directly.

Folder layout (``model_path``), the files of the hub repo THUDM/ImageReward plus a BERT tokenizer:

    ImageReward.pt        the published state dict (or ImageReward.safetensors): keys
                          blip.visual_encoder.* (timm-style ViT), blip.text_encoder.* (BLIP's med.py
                          BertModel), mlp.layers.{0,2,4,6,7}.*
    med_config.json       the BERT config of the text encoder (vocab 30524, 12 layers, cross-attention)
    tokenizer/            bert-base-uncased tokenizer files (vocab.txt, ...; ``tokenizer_path`` overrides)

The computation, as ImageReward/ImageReward.py ``ImageReward.score`` (THUDM/ImageReward, commit 0f5fa3e):
preprocess = bicubic resize of the short side to 224, centre crop 224, CLIP mean/std normalisation
(``_transform``); tokens = the tokenizer with ``[DEC]`` as bos and ``[ENC]`` added (``init_tokenizer``),
padded to 35, truncated; ``image_embeds = visual_encoder(image)`` (all tokens after the final LayerNorm, eps
1e-6); ``h = text_encoder(ids, mask, encoder_hidden_states=image_embeds)``; ``r = (mlp(h[:, 0]) -
0.16717362830052426) / 1.0333394966054072``. Key map of the vision tower (salesforce/BLIP models/vit.py ->
transformers ``BlipVisionModel``): cls_token -> embeddings.class_embedding, pos_embed ->
embeddings.position_embedding, patch_embed.proj -> embeddings.patch_embedding, blocks.i.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2} -> encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection,
layer_norm2, mlp.fc1, mlp.fc2}, norm -> post_layernorm; the text encoder's keys are transformers
``BlipTextModel``'s already. Deviation: the resize is PIL's bicubic (what torchvision's ``Resize`` does on
PIL images), on the uint8 array.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from awm_jax.rewards.base import RewardConfigError, check_batch, check_dir

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: the reward's normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 35
_VISION = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"norm\.", "post_layernorm."),
]


def vision_key(key: str) -> str:
    """The transformers ``BlipVisionModel`` name of a BLIP ViT key (without ``blip.visual_encoder.``)."""
    for pat, rep in _VISION:
        new, n = re.subn(rf"^{pat}", rep, key)
        if n:
            return new
    raise KeyError(key)


def preprocess(images: np.ndarray, size: int = 224) -> np.ndarray:
    """float32 (B, 3, size, size): bicubic short-side resize, centre crop, CLIP normalisation."""
    from PIL import Image

    out = np.empty((len(images), 3, size, size), np.float32)
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        nh, nw = (size, new_long) if h <= w else (new_long, size)
        pil = Image.fromarray(img).resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        arr = np.asarray(pil, np.float32)[top : top + size, left : left + size] / 255.0
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return out


def _load_state(model_path: str) -> tuple[dict, str]:
    for name in ("ImageReward.safetensors", "ImageReward.pt"):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            break
    else:
        raise RewardConfigError(
            f"imagereward: no ImageReward.pt or ImageReward.safetensors in {model_path!r}"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), path
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return (state.get("state_dict", state) if isinstance(state, dict) else state), path


def _load_tokenizer(path: str):
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(path)
    except Exception as e:
        raise RewardConfigError(f"imagereward: cannot load a BERT tokenizer from {path!r}: {e}") from e
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's init_tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScorer:
    """ImageReward per (image, prompt), float32 (B,); see the module docstring. ``model_path``: the folder,
    ``tokenizer_path``: the BERT tokenizer folder (default ``model_path/tokenizer``)."""

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str | None = None,
        batch_size: int = 16,
        vision_heads: int = 0,
        device: str = "cpu",
    ):
        import torch
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        from awm_jax.rewards.aesthetic import head_class

        model_path = check_dir(model_path, "imagereward model_path")
        tokenizer_path = check_dir(
            tokenizer_path or os.path.join(model_path, "tokenizer"), "imagereward tokenizer_path"
        )
        cfg_path = os.path.join(model_path, "med_config.json")
        if not os.path.isfile(cfg_path):
            raise RewardConfigError(f"imagereward: {cfg_path!r} is missing (the hub repo's med_config.json)")
        with open(cfg_path) as f:
            med = json.load(f)
        self.tokenizer = _load_tokenizer(tokenizer_path)
        state, path = _load_state(model_path)
        # the vision tower's shape from the checkpoint (ViT-L/16 at 224 px in the published one)
        try:
            vision_width = int(state["blip.visual_encoder.cls_token"].shape[-1])
            patch_size = int(state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1])
            tokens = int(state["blip.visual_encoder.pos_embed"].shape[1]) - 1
        except KeyError as e:
            raise RewardConfigError(
                f"imagereward: {path!r} has no {e.args[0]!r}: not an ImageReward state dict"
            ) from None
        vision_layers = 1 + max(
            int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks.")
        )
        image_size = int(round(tokens**0.5)) * patch_size
        vision_heads = int(vision_heads) or max(1, vision_width // 64)  # 16 for ViT-L (head width 64)
        if vision_width % vision_heads:
            raise RewardConfigError(
                f"imagereward: vision_heads = {vision_heads} does not divide the vision width "
                f"{vision_width} of {path!r}"
            )
        vcfg = BlipVisionConfig(
            hidden_size=vision_width,
            intermediate_size=4 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=image_size,
            patch_size=patch_size,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
        tcfg = BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=med["hidden_size"],
            encoder_hidden_size=vision_width,
            intermediate_size=med["intermediate_size"],
            num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"],
            max_position_embeddings=med["max_position_embeddings"],
            layer_norm_eps=med.get("layer_norm_eps", 1e-12),
            hidden_act=med.get("hidden_act", "gelu"),
            pad_token_id=med.get("pad_token_id", 0),
            is_decoder=True,
        )  # is_decoder: cross-attention
        self.vision = BlipVisionModel(vcfg).eval()
        self.text = BlipTextModel(tcfg, add_pooling_layer=False).eval()
        self.head = head_class()(med["hidden_size"]).eval()
        self._assign(state, path)
        self.image_size, self.batch_size, self.device = int(image_size), int(batch_size), device
        for m in (self.vision, self.text, self.head):
            m.to(device)
        self.torch = torch

    def _assign(self, state: dict, path: str) -> None:
        parts = {"vision": {}, "text": {}, "head": {}}
        for k, v in state.items():
            if k.startswith("blip.visual_encoder."):
                try:
                    parts["vision"][vision_key(k[len("blip.visual_encoder.") :])] = v
                except KeyError:
                    raise RewardConfigError(f"imagereward: {path!r}: unexpected vision key {k!r}") from None
            elif k.startswith("blip.text_encoder.") and not k.endswith("position_ids"):
                parts["text"][k[len("blip.text_encoder.") :]] = v
            elif k.startswith("mlp."):
                parts["head"][k[len("mlp.") :]] = v
        for name, module in (("vision", self.vision), ("text", self.text), ("head", self.head)):
            want = module.state_dict()
            got = parts[name]
            missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            if missing or unexpected:
                raise RewardConfigError(
                    f"imagereward: {path!r}: {name} keys missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            for k, v in got.items():
                if tuple(v.shape) != tuple(want[k].shape):
                    raise RewardConfigError(
                        f"imagereward: {path!r}: {name} key {k!r} has shape {tuple(v.shape)}, "
                        f"expected {tuple(want[k].shape)}"
                    )
            module.load_state_dict({k: v.float() for k, v in got.items()})

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """ImageReward scores, float32 (B,)."""
        torch = self.torch
        images, prompts, _ = check_batch(images, prompts, metadata, "imagereward")
        out = []
        with torch.inference_mode():
            for s in range(0, len(prompts), self.batch_size):
                pix = torch.from_numpy(preprocess(images[s : s + self.batch_size], self.image_size)).to(
                    self.device
                )
                tok = self.tokenizer(
                    prompts[s : s + self.batch_size],
                    padding="max_length",
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                img = self.vision(pixel_values=pix).last_hidden_state
                h = self.text(
                    input_ids=tok["input_ids"].to(self.device),
                    attention_mask=tok["attention_mask"].to(self.device),
                    encoder_hidden_states=img,
                    encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long, device=self.device),
                ).last_hidden_state
                out.append(((self.head(h[:, 0].float()).squeeze(-1) - MEAN) / STD).cpu().numpy())
        return np.concatenate(out).astype(np.float32)
