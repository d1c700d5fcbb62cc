"""Parity of the Flax NNX Qwen-Image transformer with diffusers' ``QwenImageTransformer2DModel`` (tiny random
models): MSRoPE tables, padded text masks, scan / remat, LoRA targets, logical axis names, input errors, and
the ``QwenImageFamily`` (packing, velocity, registration)."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax.models.family import family_of, get_family
from awm_jax.models.lora import LoRAConfig, LoRAParam, lora_paths, split_lora
from awm_jax.models.qwenimage import (
    QWENIMAGE_LORA_TARGETS,
    QwenImageConfig,
    QwenImageTransformer2DModel,
    msrope_tables,
    stacks,
)
from awm_jax.models.stacking import stack_state, unstack_state
from awm_jax.parallel import LOGICAL_AXIS_RULES
from tests.flux_oracle import oracle

CFG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)
# (frame, packed height, packed width), text length, text mask lengths per sample (None: no mask)
CASES = [((1, 2, 3), 5, None), ((1, 3, 2), 7, (4, 7)), ((1, 4, 4), 6, (6, 2))]
FP32_TOL = 1e-5
BF16_TOL = 3e-2


def _torch_model():
    from diffusers import QwenImageTransformer2DModel as TorchQwen

    torch.manual_seed(0)
    m = TorchQwen(**CFG).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith(".weight") and p.ndim == 1:  # RMSNorm scales away from 1 to test the mapping
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return m


def _load(model, torch_sd):
    """Test-local loader (independent of the key map): diffusers state_dict -> Flax model."""
    sd = {k: v.detach().numpy() for k, v in torch_sd.items()}
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))):
        mod, leaf = ".".join(map(str, path[:-1])), path[-1]
        name = "weight" if leaf in ("kernel", "scale") else leaf
        w = sd.pop(f"{mod}.{name}").T if leaf == "kernel" else sd.pop(f"{mod}.{name}")
        assert w.shape == var.shape, (path, w.shape, var.shape)
        flat.append((path, var.replace(value=jnp.asarray(w, var.get_value().dtype))))
    assert not sd, f"unmapped torch keys: {sorted(sd)}"
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _abstract(cfg, **kw):
    return nnx.eval_shape(lambda: QwenImageTransformer2DModel(cfg, rngs=nnx.Rngs(0), **kw))


@functools.cache
def _pair():
    tm = _torch_model()
    cfg = QwenImageConfig.from_dict(dict(tm.config), source="tiny")
    return tm, cfg, _load(_abstract(cfg), tm.state_dict())


def _inputs(grid, t_len, lens, batch=2, seed=0):
    rs = np.random.RandomState(seed)
    s = grid[0] * grid[1] * grid[2]
    mask = None
    if lens is not None:
        mask = (np.arange(t_len)[None] < np.asarray(lens)[:, None]).astype(np.int64)
    return dict(
        hidden_states=rs.randn(batch, s, CFG["in_channels"]).astype(np.float32),
        encoder_hidden_states=rs.randn(batch, t_len, CFG["joint_attention_dim"]).astype(np.float32),
        encoder_hidden_states_mask=mask,
        timestep=np.array([0.25, 0.875][:batch], np.float32),
        img_shapes=[[grid]] * batch,
    )


def _ref(tm, inputs):
    kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    with oracle():
        return tm(**kw, return_dict=False)[0].numpy()


def _fwd(model, inputs):
    shapes = inputs["img_shapes"]
    arrays = {k: v for k, v in inputs.items() if k != "img_shapes"}
    return nnx.jit(lambda m, a: m(**a, img_shapes=shapes))(model, arrays)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp32_parity(case):
    tm, cfg, fm = _pair()
    grid, t_len, lens = CASES[case]
    inputs = _inputs(grid, t_len, lens)
    ref = _ref(tm, inputs)
    out = _fwd(fm, inputs)
    assert out.shape == ref.shape == (2, int(np.prod(grid)), 4 * CFG["out_channels"])
    err = _rel(out, ref)
    print(f"[grid {grid} T={t_len} lens={lens}] fp32 rel max err {err:.2e}")
    assert err <= FP32_TOL, (grid, err)
    if lens is not None and min(lens) < t_len:
        # the mask matters: without it the padded sample's output changes
        no_mask = _fwd(fm, dict(inputs, encoder_hidden_states_mask=None))
        assert _rel(no_mask, ref) > 1e-3


def test_msrope_tables_match_diffusers():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    for fhw, t_len in (((1, 5, 8), 9), ((1, 7, 3), 4), ((2, 4, 4), 3)):
        with torch.no_grad():
            vid, txt = rope(fhw, max_txt_seq_len=t_len)
        joint = torch.cat([txt, vid]).numpy()
        cos, sin = msrope_tables(*fhw, t_len, (16, 56, 56))
        assert cos.shape == (t_len + int(np.prod(fhw)), 128)
        np.testing.assert_allclose(cos[:, 0::2], joint.real, atol=2e-6)
        np.testing.assert_allclose(sin[:, 0::2], joint.imag, atol=2e-6)
        np.testing.assert_array_equal(cos[:, 0::2], cos[:, 1::2])


def test_bf16_compute():
    tm, cfg, fm = _pair()
    bm = _abstract(cfg, dtype=jnp.bfloat16)
    nnx.update(bm, nnx.state(fm))
    inputs = _inputs(*CASES[1])
    out = _fwd(bm, inputs)
    assert out.dtype == jnp.bfloat16
    err = _rel(out, _ref(tm, inputs))
    print(f"bf16-compute rel max err {err:.2e}")
    assert 0 < err <= BF16_TOL, err


def _check_axis_names(model, scan):
    names = {r[0] for r in LOGICAL_AXIS_RULES}
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in flat:
        sn = getattr(var, "sharding_names", None)
        assert sn is not None and len(sn) == len(var.shape), path
        assert all(n is None or n in names for n in sn), (path, sn)
        if scan and "transformer_block_groups" in path:
            assert sn[0] == "layers", path


def test_remat_same_output_and_grad():
    """remat (scan "nothing_saveable" vs loop "none") changes neither the loss nor its gradient."""
    _, cfg, fm = _pair()
    inputs = _inputs(*CASES[1])
    shapes = inputs.pop("img_shapes")
    inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    ref_state = nnx.state(fm)
    outs, grads = [], []
    for scan, policy in ((True, "nothing_saveable"), (False, "none")):
        m = _abstract(cfg, scan_layers=scan, remat_policy=policy)
        nnx.update(m, stack_state(ref_state, stacks(cfg)) if scan else ref_state)
        gd, params = nnx.split(m, nnx.Param)

        def loss(p, gd=gd):
            return jnp.mean(nnx.merge(gd, p)(**inputs, img_shapes=shapes) ** 2)

        val, g = jax.jit(jax.value_and_grad(loss))(params)
        outs.append(val)
        _check_axis_names(m, scan)
        grads.append(unstack_state(g, stacks(cfg)) if scan else g)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[0], grads[1])
    assert float(jnp.max(jnp.abs(grads[1]["transformer_blocks"][0]["attn"]["add_q_proj"]["kernel"][...]))) > 0


def test_lora_targets():
    tm, cfg, fm = _pair()
    assert get_family("qwenimage").lora_targets == QWENIMAGE_LORA_TARGETS
    lora = LoRAConfig(rank=2, alpha=2.0, target_modules=QWENIMAGE_LORA_TARGETS)
    lm = _load(_abstract(cfg, lora=lora), tm.state_dict())
    lm = _with_adapters(lm)
    paths = set(lora_paths(lm))
    assert paths == {f"transformer_blocks.{i}.{m}" for i in range(2) for m in QWENIMAGE_LORA_TARGETS}
    inputs = _inputs(*CASES[1])
    base = _fwd(fm, inputs)
    assert _rel(_fwd(lm, inputs), base) <= 1e-6  # B = 0
    gd, lstate, rest = split_lora(lm)
    bumped = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if any(getattr(k, "key", None) == "lora_b" for k in p) else x, lstate
    )
    assert _rel(_fwd(nnx.merge(gd, bumped, rest), inputs), base) > 1e-3
    sm = _abstract(cfg, lora=lora, scan_layers=True)
    assert "transformer_block_groups.0.txt_mlp.net.2" in set(lora_paths(sm))
    with pytest.raises(ValueError, match=r"transformer_blocks\.\{1\}\.attn\.to_q"):
        _abstract(
            cfg, lora=LoRAConfig(rank=2, target_modules=("transformer_blocks.1.attn.to_q",)), scan_layers=True
        )


def _with_adapters(model, seed=0):
    """Concrete adapter values for an abstract model: ``lora_a`` Gaussian (std 1/r), ``lora_b`` zeros."""
    rs = np.random.RandomState(seed)
    flat = [
        (
            p,
            v.replace(
                value=jnp.asarray(
                    rs.randn(*v.shape) / v.shape[-1] if p[-1] == "lora_a" else np.zeros(v.shape), jnp.float32
                )
            ),
        )
        for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))
    ]
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def test_input_errors_and_family():
    _, cfg, fm = _pair()
    inputs = _inputs(*CASES[0])
    with pytest.raises(ValueError, match="img_shapes grid"):
        fm(**dict(inputs, img_shapes=[[(1, 3, 3)]] * 2))
    with pytest.raises(ValueError, match="differ across the batch"):
        fm(**dict(inputs, img_shapes=[[(1, 2, 3)], [(1, 3, 2)]]))
    with pytest.raises(ValueError, match="encoder_hidden_states_mask shape"):
        fm(**dict(inputs, encoder_hidden_states_mask=np.ones((2, 3))))
    with pytest.raises(ValueError, match="unknown QwenImageTransformer2DModel config keys"):
        QwenImageConfig.from_dict(dict(CFG, bogus=1))
    with pytest.raises(ValueError, match="zero_cond_t"):
        QwenImageConfig.from_dict(dict(CFG, zero_cond_t=True))
    fam = get_family("qwenimage")
    assert family_of(fm) is fam and fam.latent_shape(cfg, 64, 32) == (4, 8, 4)
    from awm_jax import config_lib

    # plans: the mask rides in the pooled slot
    run = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "configs/qwenimage_ocr.py"))
    assert fam.context_shape(run, cfg) == (run.model.max_sequence_length, 24, run.model.max_sequence_length)
    # the family's velocity = the pipeline's pack -> model(timestep=t) -> unpack
    tm = _pair()[0]
    rs = np.random.RandomState(5)
    x = rs.randn(2, 4, 4, 6).astype(np.float32)
    emb = rs.randn(2, 5, 24).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1] * 5], np.float32)
    t = np.array([0.3, 0.9], np.float32)
    v = fam.velocity(fm, x, t, (emb, mask))
    from diffusers import QwenImagePipeline

    packed = QwenImagePipeline._pack_latents(torch.from_numpy(x), 2, 4, 4, 6)
    with oracle():
        out = tm(
            hidden_states=packed,
            encoder_hidden_states=torch.from_numpy(emb),
            encoder_hidden_states_mask=torch.from_numpy(mask).long(),
            timestep=torch.from_numpy(t),
            img_shapes=[[(1, 2, 3)]] * 2,
            return_dict=False,
        )[0]
    ref = QwenImagePipeline._unpack_latents(out, 32, 48, 8)[:, :, 0].numpy()
    assert v.shape == x.shape and _rel(v, ref) <= FP32_TOL
