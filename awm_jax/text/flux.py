"""Host-side FLUX.1 text encoders (CLIP-L pooled + T5) with diffusers' exact ``encode_prompt`` output.

Mirrors ``FluxPipeline.encode_prompt`` (diffusers 0.42) for ``num_images_per_prompt=1`` and the same prompt
sent to both encoders:

* CLIP-L (``CLIPTextModel``): ``padding="max_length"`` to the tokenizer's ``model_max_length`` (77),
  truncation, no attention mask; only the ``pooler_output`` (final-norm hidden state at the EOS token) is
  used -> ``pooled (B, 768)``.
* T5 (``T5EncoderModel``): ``padding="max_length"`` to ``max_sequence_length`` (FluxPipeline's default
  512, at most 512), truncation, no attention mask, ``last_hidden_state`` -> ``prompt_embeds (B, L, 4096)``.

``encode`` returns ``(prompt_embeds, pooled)`` as float32 numpy, LRU-cached by prompt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from awm_jax.text.hf import (
    CachedEncoders,
    folder_fingerprint,
    load_component_pair,
    open_pipeline_folder,
    read_json,
)

__all__ = ["FluxTextEncoders", "MAX_T5_LENGTH"]

MAX_T5_LENGTH = 512  # FluxPipeline.check_inputs rejects longer T5 sequences


class FluxTextEncoders(CachedEncoders):
    """CLIP-L + T5 encoders of a FLUX.1 pipeline folder; ``encode`` is LRU-cached.

    Prefer :meth:`from_pipeline_dir`. ``encode(prompts)`` returns float32 numpy
    ``prompt_embeds (B, max_sequence_length, D_t5)`` and ``pooled (B, D_clip)`` identical to diffusers'
    ``FluxPipeline.encode_prompt``; ``encode_uncached`` bypasses the cache; ``cache`` is the
    :class:`~awm_jax.text.base.CachedTextEncoder` (``hits``, ``misses``, ``load_prompt_set``).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2,
        text_encoder_2,
        *,
        max_sequence_length: int = MAX_T5_LENGTH,
        device: str | torch.device = "cpu",
        cache_size: int = 256,
        chunk_size: int | None = 16,
        fingerprint: str | None = None,
    ):
        if not 1 <= int(max_sequence_length) <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_T5_LENGTH}] (FluxPipeline's limit), "
                             f"got {max_sequence_length}")
        self.device = torch.device(device)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.to(self.device).eval()
        self.text_encoder_2 = text_encoder_2.to(self.device).eval()
        self.max_sequence_length = int(max_sequence_length)
        self.tokenizer_max_length = int(tokenizer.model_max_length)
        self.embed_dim = int(text_encoder_2.config.d_model)
        self.pooled_dim = int(text_encoder.config.hidden_size)
        self.seq_len = self.max_sequence_length
        self.fingerprint = fingerprint or self._default_fingerprint()
        self._init_cache(cache_size, chunk_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pipeline_dir(
        cls,
        path: str | os.PathLike,
        max_sequence_length: int = MAX_T5_LENGTH,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cache_size: int = 256,
        chunk_size: int | None = 16,
        min_vocab_fraction: float = 0.5,
    ) -> FluxTextEncoders:
        """Load the text encoders + tokenizers of a diffusers FLUX.1 pipeline folder (offline, local files).

        Args:
            path: folder with ``model_index.json``, ``text_encoder{,_2}/`` and ``tokenizer{,_2}/``.
            max_sequence_length: T5 tokens (FluxPipeline's default and maximum: 512).
            device, dtype: torch placement of the encoders (outputs are always float32 numpy).
            cache_size, chunk_size: LRU capacity (prompts) and encoding chunk for cache misses.
            min_vocab_fraction: see :func:`~awm_jax.text.base.check_vocab_size`.

        Raises:
            FileNotFoundError / ValueError naming the folder or file; VocabularyError for a tokenizer
            whose vocabulary does not fit its encoder.
        """
        root, index = open_pipeline_folder(path, "FLUX")
        kw = dict(dtype=dtype, min_vocab_fraction=min_vocab_fraction)
        tok, enc = load_component_pair(root, index, "tokenizer", "text_encoder", expect=("CLIPTextModel",),
                                       **kw)
        tok_2, enc_2 = load_component_pair(root, index, "tokenizer_2", "text_encoder_2",
                                           expect=("T5EncoderModel",), **kw)
        if enc is None or enc_2 is None:
            raise ValueError(f"{root / 'model_index.json'}: FLUX needs both text encoders (text_encoder: "
                             "CLIPTextModel, text_encoder_2: T5EncoderModel) and their tokenizers")
        if int(tok.model_max_length) > int(enc.config.max_position_embeddings):
            raise ValueError(
                f"{root / 'tokenizer'}: model_max_length {tok.model_max_length} exceeds the CLIP encoder's "
                f"max_position_embeddings {enc.config.max_position_embeddings} (missing or wrong "
                "tokenizer_config.json?)"
            )
        tpath = root / "transformer" / "config.json"
        tcfg = read_json(tpath) if tpath.is_file() else {}
        for key, want in (("joint_attention_dim", enc_2.config.d_model),
                          ("pooled_projection_dim", enc.config.hidden_size)):
            if key in tcfg and int(tcfg[key]) != int(want):
                raise ValueError(f"{tpath}: {key} = {tcfg[key]} does not fit the text encoders ({want})")
        parts = {"root": str(root), "max_sequence_length": int(max_sequence_length), "dtype": str(dtype),
                 "vocab": [len(tok), len(tok_2)]}
        fp = folder_fingerprint("FluxTextEncoders", parts, root,
                                ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        return cls(tok, enc, tok_2, enc_2, max_sequence_length=max_sequence_length, device=device,
                   cache_size=cache_size, chunk_size=chunk_size, fingerprint=fp)

    def _default_fingerprint(self) -> str:
        parts = [type(self).__name__, str(self.max_sequence_length), str(self.tokenizer_max_length)]
        parts += [enc.config.to_json_string() for enc in (self.text_encoder, self.text_encoder_2)]
        return "FluxTextEncoders:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()

    # ------------------------------------------------------------------ encoding
    def _ids(self, tokenizer, prompts: list[str], max_length: int, which: str) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        self._truncation.check(tokenizer, prompts, max_length, which)
        return ids.to(self.device)

    @torch.inference_mode()
    def encode_uncached(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode without the cache: float32 numpy ``(B, max_sequence_length, D_t5)`` and ``(B, D_clip)``."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got a single string {prompts[:60]!r}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt, got an empty list")
        clip_ids = self._ids(self.tokenizer, prompts, self.tokenizer_max_length, "CLIP")
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self._ids(self.tokenizer_2, prompts, self.max_sequence_length, "T5")
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

