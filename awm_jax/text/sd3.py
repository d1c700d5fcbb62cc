"""Host-side SD3 / SD3.5 text encoders (CLIP-L, CLIP-G, T5) with diffusers' exact ``encode_prompt`` output.

Mirrors ``StableDiffusion3Pipeline.encode_prompt`` (diffusers 0.42) for ``num_images_per_prompt=1``,
``clip_skip=None`` and the same prompt sent to all three encoders:

* CLIP-L and CLIP-G: ``padding="max_length"`` to the *CLIP-L* tokenizer's ``model_max_length`` (77),
  truncation, no attention mask; token embeddings = ``hidden_states[-2]`` (penultimate layer, no final
  norm), pooled = the projected ``text_embeds``.
* T5: ``padding="max_length"`` to ``max_sequence_length`` (AWM uses 128, diffusers defaults to 256),
  truncation, no attention mask, ``last_hidden_state``. Without T5 (``text_encoder_3`` None): zeros of
  width ``transformer.config.joint_attention_dim``, as diffusers does.
* ``prompt_embeds = cat([pad(cat([clip_l, clip_g], -1), to T5 width), t5], axis=-2)`` -> (B, 77 + L, D);
  ``pooled = cat([pooled_l, pooled_g], -1)`` -> (B, P).

The CFG negative embeddings of diffusers (empty negative prompt) are ``encode([""] * B)``.
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

__all__ = ["SD3TextEncoders"]


class SD3TextEncoders(CachedEncoders):
    """CLIP-L + CLIP-G + (optional) T5 encoders of an SD3 pipeline folder; ``encode`` is LRU-cached.

    Prefer :meth:`from_pipeline_dir`. ``encode(prompts)`` returns float32 numpy
    ``prompt_embeds (B, 77 + max_sequence_length, D)`` and ``pooled (B, P)`` identical to diffusers'
    ``encode_prompt``; ``encode_uncached`` bypasses the cache; ``cache`` is the
    :class:`~awm_jax.text.base.CachedTextEncoder` (``hits``, ``misses``, ``load_prompt_set``).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2,
        text_encoder_2,
        tokenizer_3=None,
        text_encoder_3=None,
        *,
        max_sequence_length: int = 128,
        joint_attention_dim: int | None = None,
        device: str | torch.device = "cpu",
        cache_size: int = 256,
        chunk_size: int | None = 16,
        fingerprint: str | None = None,
    ):
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        if (tokenizer_3 is None) != (text_encoder_3 is None):
            raise ValueError("tokenizer_3 and text_encoder_3 must both be given or both be None")
        if text_encoder_3 is None and joint_attention_dim is None:
            raise ValueError(
                "without T5 (text_encoder_3=None) joint_attention_dim is needed for the zero block"
            )
        self.device = torch.device(device)
        self.tokenizers = [tokenizer, tokenizer_2]
        self.clip_encoders = [text_encoder.to(self.device).eval(), text_encoder_2.to(self.device).eval()]
        self.tokenizer_3 = tokenizer_3
        self.text_encoder_3 = None if text_encoder_3 is None else text_encoder_3.to(self.device).eval()
        self.max_sequence_length = int(max_sequence_length)
        # diffusers uses the CLIP-L tokenizer's model_max_length for both CLIP tokenizers.
        self.tokenizer_max_length = int(tokenizer.model_max_length) if tokenizer is not None else 77
        t5_dim = None if text_encoder_3 is None else int(text_encoder_3.config.d_model)
        self.embed_dim = t5_dim if t5_dim is not None else int(joint_attention_dim)
        self.pooled_dim = sum(int(e.config.projection_dim) for e in self.clip_encoders)
        clip_width = sum(int(e.config.hidden_size) for e in self.clip_encoders)
        if clip_width > self.embed_dim:
            raise ValueError(
                f"CLIP widths sum to {clip_width} > T5 / joint_attention_dim width {self.embed_dim}: "
                "cannot zero-pad the CLIP block (mismatched text encoders?)"
            )
        self.seq_len = self.tokenizer_max_length + self.max_sequence_length
        self.fingerprint = fingerprint or self._default_fingerprint()
        self._init_cache(cache_size, chunk_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pipeline_dir(
        cls,
        path: str | os.PathLike,
        max_sequence_length: int = 128,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        load_t5: bool = True,
        cache_size: int = 256,
        chunk_size: int | None = 16,
        min_vocab_fraction: float = 0.5,
    ) -> SD3TextEncoders:
        """Load the text encoders + tokenizers of a diffusers SD3 pipeline folder (offline, local files).

        Args:
            path: folder with ``model_index.json``, ``text_encoder{,_2,_3}/`` and ``tokenizer{,_2,_3}/``.
            max_sequence_length: T5 tokens (AWM: 128; diffusers' default: 256).
            device, dtype: torch placement of the encoders (outputs are always float32 numpy).
            load_t5: False (or a null ``text_encoder_3`` in model_index.json) uses diffusers' zero T5 block.
            cache_size, chunk_size: LRU capacity (prompts) and encoding chunk for cache misses.
            min_vocab_fraction: see :func:`~awm_jax.text.base.check_vocab_size`.

        Raises:
            FileNotFoundError / ValueError naming the folder or file; VocabularyError for a tokenizer
            whose vocabulary does not fit its encoder.
        """
        root, index = open_pipeline_folder(path, "SD3")

        kw = {"dtype": dtype, "min_vocab_fraction": min_vocab_fraction}
        tok_l, enc_l = load_component_pair(root, index, "tokenizer", "text_encoder", **kw)
        tok_g, enc_g = load_component_pair(root, index, "tokenizer_2", "text_encoder_2", **kw)
        if enc_l is None or enc_g is None:
            raise ValueError(
                f"{root / 'model_index.json'}: SD3 needs both CLIP encoders (text_encoder, text_encoder_2)"
            )
        tok_t5, enc_t5 = (load_component_pair(root, index, "tokenizer_3", "text_encoder_3", **kw) if load_t5
                          else (None, None))
        n_pos = min(int(enc_l.config.max_position_embeddings), int(enc_g.config.max_position_embeddings))
        if int(tok_l.model_max_length) > n_pos:
            raise ValueError(
                f"{root / 'tokenizer'}: model_max_length {tok_l.model_max_length} exceeds the CLIP encoders' "
                f"max_position_embeddings {n_pos} (missing or wrong tokenizer_config.json?)"
            )
        tcfg = read_json(root / "transformer" / "config.json") if (root / "transformer").is_dir() else {}
        joint = tcfg.get("joint_attention_dim")
        if enc_t5 is None and joint is None:
            raise ValueError(
                f"{root / 'transformer' / 'config.json'} lacks joint_attention_dim (needed without T5)"
            )
        if enc_t5 is not None and joint is not None and int(joint) != int(enc_t5.config.d_model):
            raise ValueError(
                f"{root}: transformer joint_attention_dim {joint} != T5 d_model {enc_t5.config.d_model}"
            )

        parts = {
            "root": str(root),
            "max_sequence_length": int(max_sequence_length),
            "dtype": str(dtype),
            "t5": enc_t5 is not None,
            "joint": joint,
        }
        subs = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
        parts["vocab"] = [len(t) for t in (tok_l, tok_g, tok_t5) if t is not None]
        fp = folder_fingerprint("SD3TextEncoders", parts, root,
                                [s for s in subs if s[-1] != "3" or enc_t5 is not None])
        return cls(
            tok_l, enc_l, tok_g, enc_g, tok_t5, enc_t5,
            max_sequence_length=max_sequence_length, joint_attention_dim=joint, device=device,
            cache_size=cache_size, chunk_size=chunk_size, fingerprint=fp,
        )

    def _default_fingerprint(self) -> str:
        parts = [type(self).__name__, str(self.max_sequence_length), str(self.embed_dim)]
        for enc in [*self.clip_encoders, self.text_encoder_3]:
            parts.append("none" if enc is None else enc.config.to_json_string())
        return "SD3TextEncoders:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()

    # ------------------------------------------------------------------ encoding
    def _clip(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer, encoder = self.tokenizers[index], self.clip_encoders[index]
        ids = tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        self._truncation.check(tokenizer, prompts, self.tokenizer_max_length, "CLIP")
        out = encoder(ids.to(self.device), output_hidden_states=True)
        pooled = out[0]
        hidden = out.hidden_states[-2].to(dtype=self.clip_encoders[0].dtype)
        return hidden, pooled

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder_3 is None:
            return torch.zeros(
                (len(prompts), self.max_sequence_length, self.embed_dim),
                device=self.device, dtype=self.clip_encoders[0].dtype,
            )
        ids = self.tokenizer_3(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids
        self._truncation.check(self.tokenizer_3, prompts, self.max_sequence_length, "T5")
        return self.text_encoder_3(ids.to(self.device))[0].to(dtype=self.text_encoder_3.dtype)

    @torch.inference_mode()
    def encode_uncached(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode without the cache: float32 numpy ``(B, 77 + L, D)`` and ``(B, P)``."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got a single string {prompts[:60]!r}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt, got an empty list")
        clip_l, pooled_l = self._clip(0, prompts)
        clip_g, pooled_g = self._clip(1, prompts)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        t5 = self._t5(prompts)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([pooled_l, pooled_g], dim=-1)
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

