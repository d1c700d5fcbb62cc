"""Host-side text encoders (PyTorch / transformers) and prompt-embedding caches.

``TextEncoder`` is the interface (``encode(prompts) -> (prompt_embeds (B,T,D), pooled (B,P))`` float32
numpy); ``CachedTextEncoder`` adds an LRU + on-disk prompt-set cache to any encoder; ``SD3TextEncoders``
is the SD3/SD3.5 CLIP-L + CLIP-G + T5 stack and ``FluxTextEncoders`` the FLUX.1 CLIP-L + T5 pair (both
imported lazily: they pull in torch).
"""

from awm_jax.text.base import (
    CachedTextEncoder,
    TextEncoder,
    VocabularyError,
    check_vocab_size,
    prompt_set_key,
)

__all__ = [
    "CachedTextEncoder",
    "FluxTextEncoders",
    "SD3TextEncoders",
    "TextEncoder",
    "VocabularyError",
    "check_vocab_size",
    "prompt_set_key",
]


def __getattr__(name: str):
    if name == "SD3TextEncoders":
        from awm_jax.text.sd3 import SD3TextEncoders

        return SD3TextEncoders
    if name == "FluxTextEncoders":
        from awm_jax.text.flux import FluxTextEncoders

        return FluxTextEncoders
    raise AttributeError(f"module 'awm_jax.text' has no attribute {name!r}")
