"""LAION aesthetic predictor: CLIP image embedding (ViT-L/14 in the reference) + an MLP head.

The head maps the L2-normalised image embedding through ``Linear(d, 1024) -> Linear(1024, 128)
-> Linear(128, 64) -> Linear(64, 16) -> Linear(16, 1)`` with no non-linearities (dropout only
at training time), stored under the keys ``layers.{0,2,4,6,7}.{weight,bias}`` of the public
``sac+logos+ava1-l14-linearMSE.pth`` (a torch ``.pth`` / ``.pt`` or a ``.safetensors`` file).
"""

from __future__ import annotations

import numpy as np

from awm_jax.rewards.base import RewardConfigError, check_batch, check_file
from awm_jax.rewards.clip_utils import image_features, load_clip

_LINEAR_SLOTS = (0, 2, 4, 6, 7)  # positions of the Linear layers in the public head's Sequential


def head_class():
    import torch

    class AestheticMLP(torch.nn.Module):
        """The aesthetic MLP head (input ``dim``), parameter names as in the public checkpoint."""

        def __init__(self, dim: int = 768):
            super().__init__()
            sizes = (dim, 1024, 128, 64, 16, 1)
            mods: list[torch.nn.Module] = []
            for i, slot in enumerate(_LINEAR_SLOTS):
                while len(mods) < slot:
                    mods.append(torch.nn.Identity())  # dropout slots (identity at inference)
                mods.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            self.layers = torch.nn.Sequential(*mods)

        def forward(self, x):
            return self.layers(x)

    return AestheticMLP


def __getattr__(name):  # AestheticMLP is built lazily so importing this module does not need torch
    if name == "AestheticMLP":
        return head_class()
    raise AttributeError(name)


def load_head(path: str, dim: int):
    """Load the MLP head from ``path``; missing / unexpected / mis-shaped keys raise naming them."""
    import torch

    path = check_file(path, "aesthetic head_path")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    head = head_class()(dim)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RewardConfigError(f"aesthetic: head file {path!r}: missing keys {missing}, "
                                f"unexpected keys {unexpected}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise RewardConfigError(f"aesthetic: head file {path!r}: key {k!r} has shape "
                                    f"{tuple(state[k].shape)}, expected {tuple(v.shape)} "
                                    f"(CLIP projection dim {dim})")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


class AestheticScorer:
    """Aesthetic score (about 1..10 with the public weights). Config: ``clip_path`` (CLIPModel
    folder), ``head_path`` (MLP head file), optional ``processor_path``, ``batch_size``."""

    def __init__(self, clip_path: str, head_path: str, processor_path: str | None = None,
                 batch_size: int = 32, dtype: str = "float32", device: str = "cpu"):
        self.model, self.processor = load_clip(clip_path, processor_path, "aesthetic", dtype, device)
        self.head = load_head(head_path, int(self.model.config.projection_dim)).to(device)
        self.batch_size, self.device = int(batch_size), device

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """Aesthetic score per image, float32 (B,); prompts are ignored."""
        import torch

        images, _, _ = check_batch(images, prompts, metadata, "aesthetic")
        out = []
        for s in range(0, len(images), self.batch_size):
            emb = image_features(self.model, self.processor, images[s:s + self.batch_size], self.device)
            with torch.inference_mode():
                out.append(self.head(emb).squeeze(-1).numpy())
        return np.concatenate(out).astype(np.float32)
