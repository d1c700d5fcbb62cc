"""The CLIP-family rewards' registry factories (host or accelerator) and the host HPSv2.1 / CLIPScore scorers.

Every factory takes ``device``: a torch device (``"cpu"``, ``"cuda"``) builds the host scorer (PyTorch, behind
the reward bridge); ``"accelerator"`` builds the JAX scorer of ``awm_jax.rewards.device_clip`` (scored inside
a jitted program right after the VAE decode; ``batch_size`` is then unused: the whole rollout block is one
batch).

* ``pickscore`` -- ``PickScoreScorer`` (``rewards/pickscore.py``).
* ``aesthetic`` -- ``AestheticScorer`` (``rewards/aesthetic.py``).
* ``hps`` -- HPSv2.1: an open_clip ViT-H-14 state dict (``HPS_v2.1_compressed.pt``); the score is the cosine
  of the normalised image and text features (github tgxs002/HPSv2 ``score.py``:
  ``torch.diagonal(image_features @ text_features.T)`` of the normalised ``output_dict`` features).
  Deviations: images are preprocessed by the ``CLIPImageProcessor`` of ``processor_path`` (the laion
  CLIP-ViT-H-14 folder: shortest side 224 bicubic, center crop, OpenAI mean/std -- what open_clip's
  ``image_transform`` does with torchvision's ``Resize`` on a PIL image) and prompts tokenised by that
  folder's ``CLIPTokenizer`` (the same BPE vocabulary as open_clip's ``SimpleTokenizer``; open_clip pools at
  the highest token id, the end-of-text token, so padding does not matter). The host variant needs
  ``open_clip`` (``pip install open-clip-torch``); the accelerator one does not.
* ``clipscore`` -- CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning", eq. 1): ``w * max(cos(image, text), 0)`` with ``w = 2.5`` (``weight``) on a transformers
  ``CLIPModel`` folder (the paper uses ViT-B/32). torchmetrics' ``CLIPScore`` uses ``w = 100``: set
  ``weight=100`` for that convention.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from awm_jax.rewards.base import RewardConfigError, check_batch, check_dir, check_file
from awm_jax.rewards.clip_utils import image_features, load_clip, text_features

ACCELERATOR = "accelerator"


def pickscore(
    model_path: str,
    processor_path: str | None = None,
    scale: float = 26.0,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
):
    """PickScore on the host (``device`` a torch device) or the accelerator (``device="accelerator"``)."""
    if device == ACCELERATOR:
        from awm_jax.rewards import device_clip

        return device_clip.pickscore(model_path, processor_path, scale, dtype)
    from awm_jax.rewards.pickscore import PickScoreScorer

    return PickScoreScorer(model_path, processor_path, scale, batch_size, dtype, device)


def aesthetic(
    clip_path: str,
    head_path: str,
    processor_path: str | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
):
    """LAION aesthetic predictor on the host or the accelerator."""
    if device == ACCELERATOR:
        from awm_jax.rewards import device_clip

        return device_clip.aesthetic(clip_path, head_path, processor_path, dtype)
    from awm_jax.rewards.aesthetic import AestheticScorer

    return AestheticScorer(clip_path, head_path, processor_path, batch_size, dtype, device)


def hps(
    checkpoint_path: str,
    processor_path: str,
    arch: Any = "ViT-H-14",
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
):
    """HPSv2.1 on the host or the accelerator (``arch``: open_clip architecture name, model-config JSON or
    dict)."""
    if device == ACCELERATOR:
        from awm_jax.rewards import device_clip

        return device_clip.hps(
            check_file(checkpoint_path, "hps checkpoint_path"), processor_path, arch, dtype
        )
    return HPSScorer(checkpoint_path, processor_path, arch, batch_size, device)


def clipscore(
    model_path: str,
    processor_path: str | None = None,
    weight: float = 2.5,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
):
    """CLIPScore on the host or the accelerator."""
    if device == ACCELERATOR:
        from awm_jax.rewards import device_clip

        return device_clip.clipscore(model_path, processor_path, weight, dtype)
    return CLIPScoreScorer(model_path, processor_path, weight, batch_size, dtype, device)


class CLIPScoreScorer:
    """CLIPScore ``weight * max(cos, 0)`` with a transformers ``CLIPModel`` (host, PyTorch)."""

    def __init__(
        self,
        model_path: str,
        processor_path: str | None = None,
        weight: float = 2.5,
        batch_size: int = 32,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        self.model, self.processor = load_clip(model_path, processor_path, "clipscore", dtype, device)
        self.weight, self.batch_size, self.device = float(weight), int(batch_size), device

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        images, prompts, _ = check_batch(images, prompts, metadata, "clipscore")
        out = []
        for s in range(0, len(prompts), self.batch_size):
            img = image_features(self.model, self.processor, images[s : s + self.batch_size], self.device)
            txt = text_features(self.model, self.processor, prompts[s : s + self.batch_size], self.device)
            out.append((self.weight * (img * txt).sum(-1).clamp(min=0)).numpy())
        return np.concatenate(out).astype(np.float32)


class HPSScorer:
    """HPSv2.1 on the host: an open_clip ``CLIP`` (PyTorch) with the checkpoint's weights; see the module
    docstring."""

    def __init__(
        self,
        checkpoint_path: str,
        processor_path: str,
        arch: Any = "ViT-H-14",
        batch_size: int = 32,
        device: str = "cpu",
    ):
        import torch
        from transformers import AutoProcessor

        from awm_jax.convert import ConversionError
        from awm_jax.convert.clip import open_clip_config, open_clip_key_map, open_clip_source

        checkpoint_path = check_file(checkpoint_path, "hps checkpoint_path")
        try:
            from open_clip.model import CLIP
        except ImportError as e:
            raise RewardConfigError(
                "hps: the host scorer needs open_clip (pip install open-clip-torch); "
                "reward.hps.device='accelerator' does not"
            ) from e
        try:
            cfg = open_clip_config(arch)
            src = open_clip_source(checkpoint_path)
            open_clip_key_map(cfg).plan(src, "to_flax")  # named missing / unexpected / mis-shaped tensors
        except ConversionError as e:
            raise RewardConfigError(f"hps: {e}") from e
        keys = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")
        model = CLIP(**{k: cfg[k] for k in keys if k in cfg})
        state = {k: torch.from_numpy(np.asarray(src.get(k), np.float32)) for k in src.keys()}
        state.pop("attn_mask", None)
        model.load_state_dict(state, strict=True)
        self.model = model.to(device).eval()
        proc = check_dir(processor_path, "hps processor_path")
        try:
            self.processor = AutoProcessor.from_pretrained(proc)
        except Exception as e:  # noqa: BLE001
            raise RewardConfigError(f"hps: cannot load a CLIP processor from {proc!r}: {e}") from e
        self.context = int(cfg.get("text_cfg", {}).get("context_length", 77))
        self.batch_size, self.device = int(batch_size), device

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        import torch

        images, prompts, _ = check_batch(images, prompts, metadata, "hps")
        out = []
        with torch.inference_mode():
            for s in range(0, len(prompts), self.batch_size):
                pix = self.processor(images=list(images[s : s + self.batch_size]), return_tensors="pt")
                tok = self.processor(
                    text=prompts[s : s + self.batch_size],
                    padding="max_length",
                    truncation=True,
                    max_length=self.context,
                    return_tensors="pt",
                )
                img = self.model.encode_image(pix["pixel_values"].to(self.device), normalize=True)
                txt = self.model.encode_text(tok["input_ids"].to(self.device), normalize=True)
                out.append((img * txt).sum(-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)
