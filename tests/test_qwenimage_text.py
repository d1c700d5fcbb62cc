"""The host Qwen-Image text encoder equals ``QwenImagePipeline.encode_prompt`` (tiny random Qwen2.5-VL)."""

import numpy as np
import pytest
import torch

from awm_jax.text.qwenimage import DROP_IDX, QwenImageTextEncoder
from tests.tiny_qwenimage_pipeline import build_tiny_qwenimage_pipeline


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("qwen_pipe"))


def test_encode_equals_pipeline_encode_prompt(tiny_qwen):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    enc = QwenImageTextEncoder.from_pipeline_dir(tiny_qwen, max_sequence_length=200)
    prompts = [
        "a red cat on a table",
        "two dogs",
        "a photo of a sign that says big green apple and a blue car",
    ]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (3, 200, 24) and mask.shape == (3, 200) and emb.dtype == np.float32
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=200)
    ref = ref.numpy()
    lengths = ref_mask.sum(1).numpy() if ref_mask is not None else np.full(3, ref.shape[1])
    assert len(set(lengths)) > 1  # different prompt lengths: the padding path is exercised
    np.testing.assert_array_equal(mask.sum(1), lengths)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(emb[i, :n], ref[i, :n], rtol=0, atol=1e-6)
        assert not emb[i, n:].any()
    # the dropped system turn: the template's first DROP_IDX tokens do not reach the embeddings
    text = enc.tokenizer(["<|im_start|>system\n"]).input_ids[0]
    assert len(text) < DROP_IDX
    # truncation to max_sequence_length as the pipeline's prompt_embeds[:, :max_sequence_length]
    short = QwenImageTextEncoder(enc.tokenizer, enc.text_encoder, max_sequence_length=3)
    e3, m3 = short.encode(prompts[:1])
    np.testing.assert_allclose(e3[0], ref[0, :3], atol=1e-6)
    assert m3.tolist() == [[1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImageTextEncoder(enc.tokenizer, enc.text_encoder, max_sequence_length=2000)
