"""The toy world as a model family (``model.kind = "toy"``): registers itself on import.

The transformer is the SD3 architecture (:class:`~awm_jax.models.mmdit.SD3Family`'s velocity, key map and
stacking), with the toy VAE (pixel-unshuffle by ``FACTOR``), the toy text encoder and checkpoint format
(``awm_jax.toy.world``), and the toy prompt splits as the ``toy:`` prompt source of ``awm_jax.data``.
"""

from __future__ import annotations

import json
import pathlib

from awm_jax import data
from awm_jax.models.family import register_family
from awm_jax.models.mmdit import SD3Family
from awm_jax.toy import world


class ToyFamily(SD3Family):
    """The embedded shapes world's small MMDiT (``awm_jax.toy.world``)."""

    name = "toy"
    sample_loader = ""  # toy checkpoints are not diffusers pipeline folders (the toy samples in its tests)
    default_config = "toy.py"
    architectures = {"toy": dict(world.DEFAULT_TRANSFORMER_CONFIG)}

    def text_tokens(self, config) -> int:
        """The toy word-level encoder's fixed token count."""
        from awm_jax.toy.text import MAX_TOKENS

        return MAX_TOKENS

    vae_scale_factor = world.FACTOR

    def model_config(self, path: str) -> dict:
        """The transformer config of a toy checkpoint folder (the default toy model for ``""``; an SD3
        transformer folder is read as such)."""
        if not str(path):
            return dict(world.DEFAULT_TRANSFORMER_CONFIG)
        f = pathlib.Path(path) / world.CONFIG_FILE
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"toy checkpoint config {f}: unreadable ({e})") from None
        if isinstance(d.get("transformer"), dict):
            return dict(d["transformer"])
        return super().model_config(path)

    def load_pipeline(self, config, mesh=None):  # the toy model is tiny: placed by the trainer
        return world.load_toy_pipeline(config.model.path or None, seed=config.seed)


def _toy_prompts(spec: str) -> list[dict]:
    from awm_jax.toy.shapes import parse_split_spec

    return parse_split_spec(spec)


register_family(ToyFamily())
data.register_prompt_source("toy", _toy_prompts)
