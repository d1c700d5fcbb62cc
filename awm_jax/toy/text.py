"""A small word-level text encoder for the toy shapes world.

The vocabulary is fixed: every word of the caption grammar (``awm_jax.toy.shapes``) plus a pad
token. ``ToyTextModel`` (Flax NNX) maps token ids to ``embeds = E[ids] + P[pos]`` (pad positions
get the pad embedding plus their positional embedding, as CLIP/T5 padding does in SD3) and a
pooled vector ``pooled = W mean_{non-pad}(embeds) + b``. Its weights are trained jointly with the
toy MMDiT (``awm_jax.toy.pretrain``) and stored with it.

``ToyTextEncoder`` is the host-side text-encoder interface:
``encode(prompts) -> (embeds (B,T,D) np.float32, pooled (B,P) np.float32)`` with an in-memory LRU
cache keyed by prompt. It snapshots the model's weights when constructed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.toy.shapes import CLASSES, COLORS, NUMBERS, PLURALS, RELATIONS

PAD = "<pad>"
MAX_TOKENS = 12


def vocabulary() -> list[str]:
    """The fixed toy vocabulary (index 0 is the pad token)."""
    words = {"a", "photo", "of", "and"}
    words |= set(CLASSES) | set(PLURALS.values()) | set(COLORS) | set(NUMBERS.values())
    for rel in RELATIONS:
        words |= set(rel.split())
    return [PAD] + sorted(words)


VOCAB = vocabulary()
_INDEX = {w: i for i, w in enumerate(VOCAB)}


def tokenize(prompts: list[str], max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """(B, max_tokens) int32 word ids, right-padded with 0; unknown words or long prompts raise."""
    if isinstance(prompts, str):
        raise TypeError("tokenize expects a list of prompts, got a single string")
    ids = np.zeros((len(prompts), max_tokens), np.int32)
    for i, p in enumerate(prompts):
        words = p.lower().split()
        if len(words) > max_tokens:
            raise ValueError(
                f"toy prompt {p!r} has {len(words)} words; the toy encoder takes at most {max_tokens}"
            )
        for j, w in enumerate(words):
            if w not in _INDEX:
                raise ValueError(f"unknown word {w!r} in toy prompt {p!r}; the toy vocabulary is {VOCAB[1:]}")
            ids[i, j] = _INDEX[w]
    return ids


class ToyTextModel(nnx.Module):
    """Word embeddings + learned positional embeddings; pooled = a projection of the masked mean."""

    def __init__(
        self,
        dim: int = 64,
        pooled_dim: int = 64,
        max_tokens: int = MAX_TOKENS,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        """``dim``: token width (= the MMDiT joint_attention_dim); ``pooled_dim``: pooled width."""
        self.dim, self.pooled_dim, self.max_tokens = dim, pooled_dim, max_tokens
        init = nnx.initializers.normal(1.0)
        self.token_embedding = nnx.Param(
            init(rngs.params(), (len(VOCAB), dim), param_dtype), sharding_names=("vocab", "embed")
        )
        self.position_embedding = nnx.Param(
            0.1 * init(rngs.params(), (max_tokens, dim), param_dtype), sharding_names=(None, "embed")
        )
        self.pooled_proj = nnx.Linear(
            dim,
            pooled_dim,
            rngs=rngs,
            param_dtype=param_dtype,
            kernel_metadata={"sharding_names": ("embed", None)},
            bias_metadata={"sharding_names": (None,)},
        )

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids (B, T) int -> (embeds (B, T, dim), pooled (B, pooled_dim)), float32."""
        if ids.shape[-1] != self.max_tokens:
            raise ValueError(f"toy text model expects {self.max_tokens} tokens, got ids of shape {ids.shape}")
        emb = self.token_embedding[...][ids] + self.position_embedding[...][None]
        mask = (ids != 0).astype(emb.dtype)[..., None]
        mean = (emb * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        return emb.astype(jnp.float32), self.pooled_proj(mean).astype(jnp.float32)


@jax.jit
def _apply(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


class ToyTextEncoder:
    """Host text-encoder interface over a ``ToyTextModel`` (weights snapshotted at construction).

    ``encode`` is LRU-cached by prompt through :class:`awm_jax.text.base.CachedTextEncoder` (``cache``);
    ``encode_uncached`` runs the model.
    """

    def __init__(self, model: ToyTextModel, cache_size: int = 4096):
        """``cache_size``: maximum number of prompts kept in the LRU cache."""
        from awm_jax.text.base import CachedTextEncoder

        self.graphdef, self.state = nnx.split(model)
        self.max_tokens, self.dim, self.pooled_dim = model.max_tokens, model.dim, model.pooled_dim
        self.cache = CachedTextEncoder(self.encode_uncached, max_entries=int(cache_size))

    def encode_uncached(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds (B, T, D) np.float32, pooled (B, P) np.float32), without the cache."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single string")
        emb, pooled = _apply(self.graphdef, self.state, jnp.asarray(tokenize(list(prompts), self.max_tokens)))
        return np.asarray(emb, np.float32), np.asarray(pooled, np.float32)

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds (B, T, D) np.float32, pooled (B, P) np.float32), LRU-cached by prompt."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single string")
        return self.cache.encode(prompts)
