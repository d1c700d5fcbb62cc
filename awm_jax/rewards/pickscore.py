"""PickScore reward: a CLIP model (PickScore_v1 weights in the reference) from a local folder.

``r = logit_scale.exp() * cos(text_embedding, image_embedding) / 26`` (the Flow-GRPO scaling;
``26`` is ``scale``). ``model_path`` holds the ``CLIPModel``; ``processor_path`` (default: the same
folder) its processor (the reference uses the laion CLIP-ViT-H-14 processor).
"""

from __future__ import annotations

import numpy as np

from awm_jax.rewards.base import check_batch
from awm_jax.rewards.clip_utils import image_features, load_clip, text_features


class PickScoreScorer:
    """PickScore reward; see the module docstring. ``batch_size`` bounds one forward pass."""

    def __init__(self, model_path: str, processor_path: str | None = None, scale: float = 26.0,
                 batch_size: int = 32, dtype: str = "float32", device: str = "cpu"):
        self.model, self.processor = load_clip(model_path, processor_path, "pickscore", dtype, device)
        self.scale, self.batch_size, self.device = float(scale), int(batch_size), device

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """PickScore per (image, prompt) pair, float32 (B,)."""
        images, prompts, _ = check_batch(images, prompts, metadata, "pickscore")
        out = []
        logit_scale = float(self.model.logit_scale.detach().exp())
        for s in range(0, len(prompts), self.batch_size):
            img = image_features(self.model, self.processor, images[s:s + self.batch_size], self.device)
            txt = text_features(self.model, self.processor, prompts[s:s + self.batch_size], self.device)
            out.append((logit_scale * (img * txt).sum(-1) / self.scale).numpy())
        return np.concatenate(out).astype(np.float32)
