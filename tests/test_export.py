"""Export of Flax LoRA weights to diffusers: peft LoRA folder and merged weights reproduce the Flax output."""

import json

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from flax import nnx

from awm_jax.convert import ConversionError
from awm_jax.convert import lora_export as le
from awm_jax.models import load_transformer
from awm_jax.models.lora import LoRAConfig, LoRAParam

CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
           pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
           dual_attention_layers=(0,))
INFO = dict(rank=4, alpha=8.0, base_model="tiny", algorithm="awm", reward="toy_geneval", step=7,
            which="policy")


def _key(path):
    return ".".join(str(getattr(p, "key", p)) for p in path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    SD3Transformer2DModel(**CFG).eval().save_pretrained(root / "base")
    model = load_transformer(root / "base", lora=LoRAConfig(rank=4, alpha=8))
    rng = np.random.default_rng(0)
    lora = {}
    for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        val = np.asarray(v[...])
        if p[-1] == "lora_b":
            val = rng.normal(0, 0.3, val.shape).astype(np.float32)
            v[...] = val
        lora[_key(p)] = val
    le.save_flax_lora(lora, INFO, root / "ckpt")
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    enc = rng.normal(size=(2, 5, 16)).astype(np.float32)
    pooled = rng.normal(size=(2, 12)).astype(np.float32)
    t = np.array([300.0, 800.0], np.float32)
    ref = np.asarray(model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t))
    return root, lora, (x, enc, pooled, t), ref


def _torch_out(m, inputs):
    with torch.no_grad():
        x, enc, pooled, t = (torch.from_numpy(a) for a in inputs)
        return m(x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample.numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_peft_lora_parity(setup):
    root, _, inputs, ref = setup
    dst = le.export_peft_lora(root / "ckpt", root / "peft", CFG)
    assert (dst / le.PEFT_WEIGHTS).is_file()
    m = SD3Transformer2DModel.from_pretrained(root / "base").eval()
    base = _torch_out(m, inputs)
    m.load_lora_adapter(str(dst), prefix="transformer", weight_name=le.PEFT_WEIGHTS)
    out = _torch_out(m, inputs)
    assert _rel(base, ref) > 1e-3  # the adapter matters
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    card = (dst / "README.md").read_text()
    for f in ("base_model: tiny", "algorithm: awm", "reward: toy_geneval", "step: 7", "rank: 4",
              "alpha: 8.0"):
        assert f in card


def test_merged_parity(setup):
    from tools.convert_weights import main

    root, _, inputs, ref = setup
    assert main(["to-diffusers", "--model", "sd3", "--src", str(root / "base"), "--dst", str(root / "merged"),
                 "--merge-lora", str(root / "ckpt")]) == 0
    m = SD3Transformer2DModel.from_pretrained(root / "merged").eval()
    assert _rel(_torch_out(m, inputs), ref) <= 1e-5
    assert "which: policy" in (root / "merged" / "README.md").read_text()


def test_bad_inputs(setup, tmp_path):
    root, lora, _, _ = setup
    with pytest.raises(ConversionError, match="missing lora_config.json"):
        le.load_flax_lora(tmp_path)
    bad = dict(lora, **{"transformer_blocks.0.nope.lora_a": np.zeros((16, 4), np.float32),
                        "transformer_blocks.0.nope.lora_b": np.zeros((4, 16), np.float32)})
    with pytest.raises(ConversionError, match="transformer_blocks.0.nope"):
        le.lora_to_peft(bad, CFG, 4, 8.0)
    from tools.convert_weights import main
    assert main(["export-lora", "--model", "sd3", "--base", str(root / "base"), "--src", str(tmp_path),
                 "--dst", str(tmp_path / "o")]) == 2
    assert json.loads((root / "ckpt" / le.FLAX_LORA_CONFIG).read_text())["rank"] == 4
