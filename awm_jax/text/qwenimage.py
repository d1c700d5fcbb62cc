"""Host-side Qwen-Image text encoder (Qwen2.5-VL, text only) equal to ``QwenImagePipeline.encode_prompt``.

Mirrors ``QwenImagePipeline._get_qwen_prompt_embeds`` (diffusers 0.42 ``pipelines/qwenimage/
pipeline_qwenimage.py``): each prompt is put into the pipeline's fixed template (a system turn asking to
describe the image, the user turn with the prompt, an open assistant turn; Python ``str.format``, not the
tokenizer's chat template), tokenized with ``max_length = 1024 + 34``, padding and truncation, encoded with
the attention mask; the **last** hidden states of the real (mask = 1) tokens are taken and their first
``drop_idx = 34`` rows (the system turn) dropped. diffusers pads the batch to its longest prompt; here the
rows are packed to the front of a static ``(B, max_sequence_length, D)`` array (zeros after, the pipeline's
``prompt_embeds[:, :max_sequence_length]`` truncation applied) and the "pooled" slot of the project's text
encoder contract carries the mask ``(B, max_sequence_length)`` float32 (what
:class:`~awm_jax.models.qwenimage.QwenImageFamily` feeds as ``encoder_hidden_states_mask``). The extra
padded rows are masked keys, so the transformer's output equals the pipeline's.

``encode`` returns ``(embeds, mask)`` as float32 numpy, LRU-cached by prompt (the shared cache).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from awm_jax.text.base import check_vocab_size
from awm_jax.text.hf import (
    CachedEncoders,
    component_class,
    folder_fingerprint,
    open_pipeline_folder,
    read_json,
    transformers_class,
)

__all__ = ["DEFAULT_MAX_LENGTH", "DROP_IDX", "PROMPT_TEMPLATE", "QwenImageTextEncoder"]

# QwenImagePipeline.__init__: prompt_template_encode, prompt_template_encode_start_idx, tokenizer_max_length
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP_IDX = 34
TOKENIZER_MAX_LENGTH = 1024
DEFAULT_MAX_LENGTH = 512  # QwenImagePipeline.__call__'s max_sequence_length default
ENCODER_CLASSES = ("Qwen2_5_VLForConditionalGeneration",)


class QwenImageTextEncoder(CachedEncoders):
    """Qwen2.5-VL + tokenizer of a Qwen-Image pipeline folder; ``encode`` is LRU-cached."""

    def __init__(
        self,
        tokenizer,
        text_encoder,
        *,
        max_sequence_length: int = DEFAULT_MAX_LENGTH,
        device: str | torch.device = "cpu",
        cache_size: int = 256,
        chunk_size: int | None = 16,
        fingerprint: str | None = None,
    ):
        if not 1 <= int(max_sequence_length) <= TOKENIZER_MAX_LENGTH:
            raise ValueError(
                f"max_sequence_length must be in [1, {TOKENIZER_MAX_LENGTH}] (QwenImagePipeline's "
                f"limit), got {max_sequence_length}"
            )
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(self.device).eval()
        self.max_sequence_length = self.seq_len = int(max_sequence_length)
        cfg = text_encoder.config
        self.embed_dim = int(getattr(cfg, "text_config", cfg).hidden_size)
        self.pooled_dim = self.max_sequence_length  # the mask rides in the "pooled" slot
        self.fingerprint = fingerprint or self._default_fingerprint()
        self._init_cache(cache_size, chunk_size)

    @classmethod
    def from_pipeline_dir(
        cls,
        path: str | os.PathLike,
        max_sequence_length: int = DEFAULT_MAX_LENGTH,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cache_size: int = 256,
        chunk_size: int | None = 16,
        min_vocab_fraction: float = 0.5,
    ) -> QwenImageTextEncoder:
        """Load ``text_encoder/`` (Qwen2.5-VL) + ``tokenizer/`` of a diffusers Qwen-Image pipeline folder
        (offline). Raises naming the folder or file (a missing encoder, a width that does not fit the
        transformer's ``joint_attention_dim``)."""
        root, index = open_pipeline_folder(path, "Qwen-Image")
        tok, enc = _load_pair(root, index, dtype, min_vocab_fraction)
        width = int(getattr(enc.config, "text_config", enc.config).hidden_size)
        tpath = root / "transformer" / "config.json"
        tcfg = read_json(tpath) if tpath.is_file() else {}
        if "joint_attention_dim" in tcfg and int(tcfg["joint_attention_dim"]) != width:
            raise ValueError(
                f"{tpath}: joint_attention_dim = {tcfg['joint_attention_dim']} does not fit the "
                f"text encoder's hidden_size {width}"
            )
        parts = {
            "root": str(root),
            "max_sequence_length": int(max_sequence_length),
            "dtype": str(dtype),
            "vocab": len(tok),
        }
        fp = folder_fingerprint("QwenImageTextEncoder", parts, root, ("text_encoder", "tokenizer"))
        return cls(
            tok,
            enc,
            max_sequence_length=max_sequence_length,
            device=device,
            cache_size=cache_size,
            chunk_size=chunk_size,
            fingerprint=fp,
        )

    def _default_fingerprint(self) -> str:
        parts = [
            type(self).__name__,
            str(self.max_sequence_length),
            self.text_encoder.config.to_json_string(),
        ]
        return "QwenImageTextEncoder:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()

    @torch.inference_mode()
    def encode_uncached(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode without the cache: float32 numpy ``(B, T, D)`` embeddings and ``(B, T)`` mask."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got a single string {prompts[:60]!r}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt, got an empty list")
        text = [PROMPT_TEMPLATE.format(p) for p in prompts]
        max_len = TOKENIZER_MAX_LENGTH + DROP_IDX
        inputs = self.tokenizer(text, max_length=max_len, padding=True, truncation=True, return_tensors="pt")
        self._truncation.check(self.tokenizer, text, max_len, "Qwen2.5-VL")
        mask = inputs.attention_mask.to(self.device)
        hidden = (
            self.text_encoder(
                input_ids=inputs.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True
            )
            .hidden_states[-1]
            .float()
            .cpu()
            .numpy()
        )
        mask = mask.bool().cpu().numpy()
        t = self.max_sequence_length
        emb = np.zeros((len(prompts), t, hidden.shape[-1]), np.float32)
        out_mask = np.zeros((len(prompts), t), np.float32)
        for i in range(len(prompts)):
            rows = hidden[i][mask[i]][DROP_IDX:][:t]  # real tokens, the system turn dropped, truncated
            emb[i, : len(rows)], out_mask[i, : len(rows)] = rows, 1.0
        return emb, out_mask


def _load_pair(root, index: dict, dtype, min_vocab_fraction: float):
    """``tokenizer/`` + ``text_encoder/`` (offline). Like :func:`awm_jax.text.hf.load_component_pair`, but
    Qwen2.5-VL keeps ``vocab_size`` in its ``text_config``."""
    tok_cls, enc_cls = component_class(index, "tokenizer", root), component_class(index, "text_encoder", root)
    if tok_cls is None or enc_cls is None:
        raise ValueError(
            f"{root / 'model_index.json'}: Qwen-Image needs text_encoder "
            "(Qwen2_5_VLForConditionalGeneration) and tokenizer"
        )
    if enc_cls not in ENCODER_CLASSES:
        raise ValueError(
            f"{root / 'model_index.json'}: component 'text_encoder' is {enc_cls!r}, expected one "
            f"of {list(ENCODER_CLASSES)}"
        )
    for d in (root / "tokenizer", root / "text_encoder"):
        if not d.is_dir():
            raise FileNotFoundError(f"model_index.json lists {d.name!r} but folder {d} is missing")
    tok = transformers_class(tok_cls, root, "tokenizer").from_pretrained(
        str(root / "tokenizer"), local_files_only=True
    )
    enc = transformers_class(enc_cls, root, "text_encoder").from_pretrained(
        str(root / "text_encoder"), local_files_only=True, dtype=dtype
    )
    cfg = getattr(enc.config, "text_config", enc.config)
    check_vocab_size(
        len(tok),
        int(cfg.vocab_size),
        root / "tokenizer",
        what=f"tokenizer ({tok_cls})",
        min_fraction=min_vocab_fraction,
    )
    return tok, enc
