"""Qwen-Image LoRA export: a Flax LoRA model's adapters written in the diffusers/peft format load into
diffusers (``QwenImageTransformer2DModel.load_lora_adapter`` and ``QwenImagePipeline.load_lora_weights``) and
reproduce the Flax LoRA model's output; the merged export (base + LoRA folded, ``to_diffusers``) too."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from flax import nnx

from awm_jax.convert import read_flax_params, save_flax, to_diffusers
from awm_jax.convert.lora_export import PEFT_WEIGHTS, merge_lora, read_peft_lora, write_peft_lora
from awm_jax.models.lora import LoRAConfig, LoRAParam
from awm_jax.models.qwenimage import QWENIMAGE_LORA_TARGETS
from tests.flux_oracle import oracle
from tests.test_qwenimage_convert import _tiny
from tests.test_qwenimage_model import _fwd, _rel


def _flax_lora_params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}


def test_peft_export_loads_in_diffusers_and_matches(tmp_path):
    from awm_jax.models.loading import load_transformer

    src = tmp_path / "transformer"
    _tiny(seed=3).save_pretrained(src)
    lora = LoRAConfig(rank=2, alpha=4.0, target_modules=QWENIMAGE_LORA_TARGETS)
    model = load_transformer(src, lora=lora, seed=1)
    gd, lstate, rest = nnx.split(model, LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 200))
    lstate = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), lstate)
    model = nnx.merge(gd, lstate, rest)
    params = _flax_lora_params(model)
    assert len(params) == 2 * 2 * len(QWENIMAGE_LORA_TARGETS)
    config, _, _ = read_flax_params(src, "qwenimage")
    dst = write_peft_lora(params, {"rank": 2, "alpha": 4.0}, tmp_path / "peft", config, "qwenimage")
    back, info = read_peft_lora(dst)
    assert info == {"rank": 2, "alpha": 4.0} and set(back) == set(params)

    rs = np.random.RandomState(0)
    x = dict(hidden_states=rs.randn(2, 6, 16).astype(np.float32),
             encoder_hidden_states=rs.randn(2, 5, 24).astype(np.float32),
             encoder_hidden_states_mask=np.array([[1, 1, 1, 1, 0], [1] * 5]),
             timestep=np.array([0.4, 0.8], np.float32), img_shapes=[[(1, 2, 3)]] * 2)
    kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in x.items()}
    flax_out = _fwd(model, x)
    base = _fwd(load_transformer(src), x)
    assert _rel(flax_out, base) > 1e-2  # the adapters matter

    tm = QwenImageTransformer2DModel.from_pretrained(src).eval()
    tm.load_lora_adapter(str(dst), prefix="transformer", weight_name=PEFT_WEIGHTS)
    with oracle():
        ref = tm(**kw).sample.numpy()
    err = _rel(flax_out, ref)
    print(f"LoRA export: flax LoRA model vs diffusers + adapter rel max err {err:.2e}")
    assert err <= 1e-5

    # the pipeline-level loader takes the same folder (text encoder / VAE are not needed for that)
    fresh = QwenImageTransformer2DModel.from_pretrained(src).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=fresh)
    pipe.load_lora_weights(str(dst))
    with oracle():
        assert _rel(pipe.transformer(**kw).sample.numpy(), ref) <= 1e-6

    # merged export: W + A B alpha / r folded into the base, written as a diffusers folder
    base_cfg, _, tensors = read_flax_params(src, "qwenimage")
    merged = merge_lora(dict(tensors), params, 2, 4.0)
    save_flax(merged, base_cfg, tmp_path / "merged_flax", "qwenimage")
    to_diffusers(tmp_path / "merged_flax", tmp_path / "merged", "qwenimage")
    with oracle():
        mref = QwenImageTransformer2DModel.from_pretrained(tmp_path / "merged").eval()(**kw).sample.numpy()
    assert _rel(mref, ref) <= 1e-5
    assert jnp.isfinite(flax_out).all()
