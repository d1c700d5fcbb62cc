"""Host-side Z-Image text encoder (Qwen3) with diffusers' exact ``ZImagePipeline.encode_prompt`` output.

Mirrors ``ZImagePipeline._encode_prompt`` (diffusers 0.42): every prompt is wrapped by the tokenizer's chat
template (``[{"role": "user", "content": prompt}]``, ``add_generation_prompt=True``,
``enable_thinking=True``), tokenized with ``padding="max_length"`` to ``max_sequence_length`` (the
pipeline's default 512) and
truncation, and encoded with the attention mask; the caption features are the **second-to-last** hidden
states (``hidden_states[-2]``) of the real (mask = 1) tokens. diffusers returns them as a list of
variable-length tensors; here they are packed to the front of a static ``(B, max_sequence_length, D)``
array (zeros after each prompt's tokens) and the "pooled" slot of the project's text-encoder contract
carries their prefix mask ``(B, max_sequence_length)`` float32 -- what :class:`~awm_jax.models.zimage.
ZImageFamily` feeds the transformer (``cap_feats``, ``cap_mask``).

``encode`` returns ``(embeds, mask)`` as float32 numpy, LRU-cached by prompt.
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

__all__ = ["DEFAULT_MAX_LENGTH", "ZImageTextEncoder"]

DEFAULT_MAX_LENGTH = 512  # ZImagePipeline's max_sequence_length default
ENCODER_CLASSES = ("Qwen3Model", "Qwen3ForCausalLM")


class ZImageTextEncoder(CachedEncoders):
    """Qwen3 encoder + tokenizer of a Z-Image pipeline folder; ``encode`` is LRU-cached.

    ``encode(prompts)`` returns float32 numpy ``embeds (B, max_sequence_length, D)`` (the prompt's
    ``hidden_states[-2]`` rows first, zeros after) and ``mask (B, max_sequence_length)`` (1 on those rows).
    """

    def __init__(self, tokenizer, text_encoder, *, max_sequence_length: int = DEFAULT_MAX_LENGTH,
                 device: str | torch.device = "cpu", cache_size: int = 256, chunk_size: int | None = 16,
                 fingerprint: str | None = None):
        if int(max_sequence_length) < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("Z-Image text encoder: the tokenizer has no chat_template (ZImagePipeline wraps "
                             "every prompt in it); check the tokenizer folder's chat template")
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(self.device).eval()
        self.max_sequence_length = self.seq_len = int(max_sequence_length)
        self.embed_dim = int(text_encoder.config.hidden_size)
        self.pooled_dim = self.max_sequence_length  # the mask rides in the "pooled" slot
        self.fingerprint = fingerprint or self._default_fingerprint()
        self._init_cache(cache_size, chunk_size)

    @classmethod
    def from_pipeline_dir(cls, path: str | os.PathLike, max_sequence_length: int = DEFAULT_MAX_LENGTH,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                          cache_size: int = 256, chunk_size: int | None = 16,
                          min_vocab_fraction: float = 0.5) -> ZImageTextEncoder:
        """Load ``text_encoder/`` (Qwen3) + ``tokenizer/`` of a diffusers Z-Image pipeline folder (offline).

        Raises FileNotFoundError / ValueError naming the folder or file (a missing encoder, a caption width
        that does not fit the transformer's ``cap_feat_dim``)."""
        root, index = open_pipeline_folder(path, "Z-Image")
        tok, enc = load_component_pair(root, index, "tokenizer", "text_encoder", expect=ENCODER_CLASSES,
                                       dtype=dtype, min_vocab_fraction=min_vocab_fraction)
        if enc is None:
            raise ValueError(f"{root / 'model_index.json'}: Z-Image needs text_encoder (Qwen3Model) and "
                             "tokenizer")
        tpath = root / "transformer" / "config.json"
        tcfg = read_json(tpath) if tpath.is_file() else {}
        if "cap_feat_dim" in tcfg and int(tcfg["cap_feat_dim"]) != int(enc.config.hidden_size):
            raise ValueError(f"{tpath}: cap_feat_dim = {tcfg['cap_feat_dim']} does not fit the text "
                             f"encoder's hidden_size {enc.config.hidden_size}")
        parts = {"root": str(root), "max_sequence_length": int(max_sequence_length), "dtype": str(dtype),
                 "vocab": len(tok)}
        fp = folder_fingerprint("ZImageTextEncoder", parts, root, ("text_encoder", "tokenizer"))
        return cls(tok, enc, max_sequence_length=max_sequence_length, device=device, cache_size=cache_size,
                   chunk_size=chunk_size, fingerprint=fp)

    def _default_fingerprint(self) -> str:
        parts = [type(self).__name__, str(self.max_sequence_length),
                 self.text_encoder.config.to_json_string(), str(self.tokenizer.chat_template)]
        return "ZImageTextEncoder:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def templated(self, prompts: Sequence[str]) -> list[str]:
        """The prompts wrapped by the chat template exactly as ``ZImagePipeline._encode_prompt`` does."""
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True)
                for p in prompts]

    @torch.inference_mode()
    def encode_uncached(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode without the cache: float32 numpy ``(B, T, D)`` features and ``(B, T)`` mask."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got a single string {prompts[:60]!r}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt, got an empty list")
        text = self.templated(prompts)
        t = self.max_sequence_length
        inputs = self.tokenizer(text, padding="max_length", max_length=t, truncation=True,
                                return_tensors="pt")
        self._truncation.check(self.tokenizer, text, t, "Qwen3")
        mask = inputs.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=inputs.input_ids.to(self.device), attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-2].float().cpu().numpy()
        mask = mask.cpu().numpy()
        emb = np.zeros((len(prompts), t, hidden.shape[-1]), np.float32)
        out_mask = np.zeros((len(prompts), t), np.float32)
        for i in range(len(prompts)):  # the real tokens' rows, packed to the front (left or right padding)
            rows = hidden[i][mask[i]]
            emb[i, :len(rows)], out_mask[i, :len(rows)] = rows, 1.0
        return emb, out_mask
