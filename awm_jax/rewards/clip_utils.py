"""Host-side CLIP helpers (transformers, PyTorch) shared by PickScore, aesthetic and GenEval.

``load_clip(model_path, processor_path)`` loads a ``CLIPModel`` and its processor from local
folders (a missing folder raises naming it); ``image_features`` / ``text_features`` return
L2-normalised float32 torch embeddings and accept both the transformers 4 (tensor) and 5
(``BaseModelOutputWithPooling``) return types of ``get_*_features``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from awm_jax.rewards.base import RewardConfigError, check_dir


def load_clip(model_path: str, processor_path: str | None, who: str, dtype: str = "float32",
              device: str = "cpu") -> tuple[Any, Any]:
    """Load ``(CLIPModel in eval mode, processor)`` from local folders; errors name the path."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    model_path = check_dir(model_path, f"{who} model_path")
    processor_path = check_dir(processor_path or model_path, f"{who} processor_path")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise RewardConfigError(f"{who}: dtype must be float32/float16/bfloat16, got {dtype!r}")
    try:
        model = CLIPModel.from_pretrained(model_path, dtype=getattr(torch, dtype))
    except Exception as e:
        raise RewardConfigError(f"{who}: cannot load a CLIPModel from {model_path!r}: {e}") from e
    try:
        processor = AutoProcessor.from_pretrained(processor_path)
    except Exception as e:
        raise RewardConfigError(f"{who}: cannot load a CLIP processor from {processor_path!r}: {e}") from e
    return model.to(device).eval(), processor


def _pooled(out: Any) -> Any:
    return out if hasattr(out, "norm") else out.pooler_output


def image_features(model: Any, processor: Any, images: list | np.ndarray, device: str = "cpu") -> Any:
    """L2-normalised float32 image embeddings (B, proj) of a list of uint8 HWC arrays / PIL images."""
    import torch

    with torch.inference_mode():
        pix = processor(images=list(images), return_tensors="pt")["pixel_values"]
        pix = pix.to(device=device, dtype=model.dtype)
        emb = _pooled(model.get_image_features(pixel_values=pix)).float()
        return emb / emb.norm(dim=-1, keepdim=True)


def text_features(model: Any, processor: Any, texts: list[str], device: str = "cpu") -> Any:
    """L2-normalised float32 text embeddings (B, proj); truncated to 77 tokens."""
    import torch

    with torch.inference_mode():
        tok = processor(text=list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        emb = _pooled(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                              attention_mask=tok["attention_mask"].to(device))).float()
        return emb / emb.norm(dim=-1, keepdim=True)
