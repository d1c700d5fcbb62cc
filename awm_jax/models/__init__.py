"""awm_jax.models: Flax NNX networks, the model-family registry and the weight loaders.

- :mod:`awm_jax.models.family`: :class:`ModelFamily` and its registry (``get_family("sd35")``,
  ``family_of(model)``); a family's specifics live in its own module (``mmdit`` for SD3 / SD3.5, ``flux``
  for FLUX.1, ``awm_jax.toy.family`` for the toy world).
- :mod:`awm_jax.models.blocks`: attention, adaLN-Zero, feed-forward and stacking blocks shared by families.
- :func:`load_transformer` (any family, recognised from ``config.json``), :func:`transformer_params`,
  :func:`load_vae`.
"""

from __future__ import annotations

from awm_jax.models.family import ModelFamily, family_names, family_of, get_family, register_family
from awm_jax.models.loading import detect_family, load_transformer, transformer_params
from awm_jax.models.lora import LoRAConfig, LoRAParam
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel, stack_state, unstack_state
from awm_jax.models.vae import AutoencoderKL, VAEConfig, load_vae

__all__ = [
    "AutoencoderKL",
    "LoRAConfig",
    "LoRAParam",
    "ModelFamily",
    "SD3Config",
    "SD3Transformer2DModel",
    "VAEConfig",
    "detect_family",
    "family_names",
    "family_of",
    "get_family",
    "load_transformer",
    "load_vae",
    "register_family",
    "stack_state",
    "transformer_params",
    "unstack_state",
]
