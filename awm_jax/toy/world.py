"""The toy pipeline: shapes world + toy text encoder + a small SD3-architecture MMDiT.

``load_toy_pipeline(path_or_None, seed=0)`` returns a ``ToyPipeline`` implementing the pipeline
contract the trainer consumes:

- ``text_encoder.encode(prompts) -> (embeds (B,T,D) np.float32, pooled (B,P) np.float32)``
- ``transformer``: a Flax NNX ``awm_jax.models.mmdit.SD3Transformer2DModel``
- ``decode(latents (B,C,H,W)) -> uint8 images (B,H,W,3)`` (pure jnp, jittable)
- ``latent_shape -> (C, h, w)``

The toy "VAE" is fixed and exactly invertible: pixel-unshuffle by ``FACTOR`` (32x32x3 -> 48x8x8,
channels-first), with pixels in [0, 1] standardised by ``LATENT_SHIFT`` / ``LATENT_SCALE`` (the mean
and std of rendered training images) so latents have about unit variance.

Checkpoint directory layout (written by ``save_toy_checkpoint``): ``config.json`` (``{"transformer":
SD3 config dict, "text": {...}, "image_size": ...}``) and ``model.safetensors`` holding the flat
parameters, keys ``transformer.<path>`` and ``text.<path>`` (NNX state paths joined by ``.``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.toy.shapes import IMAGE_SIZE
from awm_jax.toy.text import MAX_TOKENS, ToyTextEncoder, ToyTextModel

FACTOR = 4
LATENT_SHIFT = 0.0557
LATENT_SCALE = 0.1955
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

DEFAULT_TRANSFORMER_CONFIG = {
    "sample_size": IMAGE_SIZE // FACTOR,
    # patch 1: 64 tokens of 48 values.  Patch 2 (16 tokens of 192 values through a 64-wide model) was a
    # bottleneck: after the same 12 minutes on one core each its clean validation loss was 0.88 (7286 steps)
    # against 0.18 for patch 1 (2318 steps).
    "patch_size": 1,
    "in_channels": 3 * FACTOR * FACTOR,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 64,
    "out_channels": 3 * FACTOR * FACTOR,
    "pos_embed_max_size": IMAGE_SIZE // FACTOR,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}
DEFAULT_TEXT_CONFIG = {"dim": 64, "pooled_dim": 64, "max_tokens": MAX_TOKENS}


def encode_images(images) -> jax.Array:
    """uint8 images (B, S, S, 3) -> latents (B, 3 F^2, S/F, S/F) float32 (exact inverse of ``decode``)."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    x = x.reshape(b, h // FACTOR, FACTOR, w // FACTOR, FACTOR, c)
    x = x.transpose(0, 2, 4, 5, 1, 3).reshape(b, FACTOR * FACTOR * c, h // FACTOR, w // FACTOR)
    return (x - LATENT_SHIFT) / LATENT_SCALE


def decode(latents) -> jax.Array:
    """latents (B, 3 F^2, h, w) -> uint8 images (B, h F, w F, 3); pure jnp and jittable."""
    x = jnp.asarray(latents, jnp.float32) * LATENT_SCALE + LATENT_SHIFT
    b, ch, h, w = x.shape
    c = ch // (FACTOR * FACTOR)
    x = (
        x.reshape(b, FACTOR, FACTOR, c, h, w)
        .transpose(0, 4, 1, 5, 2, 3)
        .reshape(b, h * FACTOR, w * FACTOR, c)
    )
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@dataclasses.dataclass
class ToyPipeline:
    """The toy world's pipeline (see the module docstring for the contract)."""

    transformer: nnx.Module
    text_model: ToyTextModel
    text_encoder: ToyTextEncoder
    config: dict
    reward_name: str = "toy_geneval"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        t = self.config["transformer"]
        return (t["in_channels"], t["sample_size"], t["sample_size"])

    @staticmethod
    def decode(latents) -> jax.Array:
        """latents (B, C, h, w) -> uint8 images (B, H, W, 3)."""
        return decode(latents)

    @staticmethod
    def encode_images(images) -> jax.Array:
        """uint8 images -> latents (the toy VAE encoder)."""
        return encode_images(images)


def build_models(config: dict, seed: int = 0):
    """Random-init (transformer, text model) for a toy config dict."""
    from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel

    rngs = nnx.Rngs(seed)
    tcfg = SD3Config.from_dict(dict(config["transformer"]))
    transformer = SD3Transformer2DModel(tcfg, rngs=rngs)
    text = config["text"]
    text_model = ToyTextModel(text["dim"], text["pooled_dim"], text["max_tokens"], rngs=rngs)
    return transformer, text_model


def default_config() -> dict:
    """The default toy config dict (what ``config.json`` holds)."""
    return {
        "transformer": dict(DEFAULT_TRANSFORMER_CONFIG),
        "text": dict(DEFAULT_TEXT_CONFIG),
        "image_size": IMAGE_SIZE,
        "latent_factor": FACTOR,
        "latent_shift": LATENT_SHIFT,
        "latent_scale": LATENT_SCALE,
    }


def _flat(module: nnx.Module, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        out[prefix + ".".join(str(p) for p in path)] = np.asarray(
            v.get_value() if hasattr(v, "get_value") else v.value
        )
    return out


def save_toy_checkpoint(path, transformer, text_model, config: dict, dtype=np.float16) -> None:
    """Write ``config.json`` + ``model.safetensors`` (parameters stored as ``dtype``) into ``path``."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {**_flat(transformer, "transformer."), **_flat(text_model, "text.")}
    save_file(
        {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}, str(path / WEIGHTS_FILE)
    )
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _load_into(module: nnx.Module, prefix: str, tensors: dict, file: pathlib.Path, used: set) -> None:
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    new = []
    for path, v in flat:
        key = prefix + ".".join(str(p) for p in path)
        if key not in tensors:
            raise KeyError(f"{file}: missing parameter {key!r}")
        arr = tensors[key]
        cur = v.get_value() if hasattr(v, "get_value") else v.value
        if tuple(arr.shape) != tuple(cur.shape):
            raise ValueError(
                f"{file}: parameter {key!r} has shape {arr.shape}, the model expects {cur.shape}"
            )
        used.add(key)
        new.append((path, v.replace(jnp.asarray(arr, cur.dtype))))
    nnx.update(module, nnx.from_flat_state(new))


def load_toy_pipeline(path_or_none=None, seed: int = 0) -> ToyPipeline:
    """Toy pipeline from a checkpoint directory, or a random-init one when ``path_or_none`` is None or ""."""
    if path_or_none is None or str(path_or_none) == "":
        config = default_config()
        transformer, text_model = build_models(config, seed)
    else:
        from safetensors.numpy import load_file

        path = pathlib.Path(path_or_none)
        cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise FileNotFoundError(f"toy checkpoint file {f} does not exist")
        config = json.loads(cfg_file.read_text())
        for k in ("transformer", "text"):
            if k not in config:
                raise KeyError(f"{cfg_file}: missing key {k!r}")
        if (config.get("latent_shift"), config.get("latent_scale"), config.get("latent_factor")) != (
            LATENT_SHIFT,
            LATENT_SCALE,
            FACTOR,
        ):
            raise ValueError(
                f"{cfg_file}: latent_shift/scale/factor differ from this code's toy VAE "
                f"({LATENT_SHIFT}, {LATENT_SCALE}, {FACTOR})"
            )
        transformer, text_model = build_models(config, seed)
        tensors, used = load_file(str(w_file)), set()
        _load_into(transformer, "transformer.", tensors, w_file, used)
        _load_into(text_model, "text.", tensors, w_file, used)
        extra = sorted(set(tensors) - used)
        if extra:
            raise KeyError(f"{w_file}: unexpected parameters {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return ToyPipeline(transformer, text_model, ToyTextEncoder(text_model), config)
