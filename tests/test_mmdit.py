"""Parity of the Flax NNX SD3/SD3.5 MMDiT with diffusers' ``SD3Transformer2DModel`` (tiny random models)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax.models.lora import LoRAConfig, LoRAParam, count_lora_params, lora_paths, split_lora, zero_lora
from awm_jax.models.mmdit import (
    SD3Config,
    SD3Transformer2DModel,
    pos_embed_table,
    stack_state,
    unstack_state,
)
from awm_jax.parallel import LOGICAL_AXIS_RULES

BASE = dict(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
            pos_embed_max_size=8)
CONFIGS = {
    "sd3m": dict(BASE, num_layers=3, qk_norm=None, dual_attention_layers=()),
    "sd35m": dict(BASE, num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd35l": dict(BASE, num_layers=3, qk_norm="rms_norm", dual_attention_layers=()),
    "ln_nomax": dict(BASE, num_layers=2, qk_norm="layer_norm", dual_attention_layers=(0,),
                     pos_embed_max_size=None),
}
# latent sizes per config: non-square, smaller than the max (crop), full max
SIZES = {"sd3m": [(8, 12), (16, 16)], "sd35m": [(8, 12), (12, 8)], "sd35l": [(4, 6), (16, 16)],
         "ln_nomax": [(8, 8), (8, 12)]}
FP32_TOL = 1e-5
BF16_TOL = 3e-2


def _torch_model(name):
    from diffusers import SD3Transformer2DModel as TorchSD3

    torch.manual_seed(sum(map(ord, name)))
    m = TorchSD3(**CONFIGS[name]).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith(".weight") and p.ndim == 1:  # norm scales: away from 1 to test the mapping
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return m


def _load(model, torch_sd):
    """Test-local loader: diffusers state_dict -> Flax model (loop layout, non-LoRA params)."""
    sd = {k: v.detach().numpy() for k, v in torch_sd.items()}
    table = sd.pop("pos_embed.pos_embed", None)
    if table is not None:  # the diffusers buffer equals our recomputed table
        np.testing.assert_allclose(table, pos_embed_table(model.config), atol=1e-6)
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    flat = []
    for path, var in nnx.to_flat_state(state):
        mod, leaf = ".".join(map(str, path[:-1])), path[-1]
        if leaf == "kernel":
            w = sd.pop(f"{mod}.weight")
            w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
        elif leaf == "scale":
            w = sd.pop(f"{mod}.weight")
        else:
            w = sd.pop(f"{mod}.{leaf}")
        assert w.shape == var.shape, (path, w.shape, var.shape)
        flat.append((path, var.replace(value=jnp.asarray(w, var.get_value().dtype))))
    assert not sd, f"unmapped torch keys: {sorted(sd)}"
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _inputs(name, size, batch=2, seq=5, seed=0):
    c = CONFIGS[name]
    rs = np.random.RandomState(seed)
    x = rs.randn(batch, c["in_channels"], *size).astype(np.float32)
    ctx = rs.randn(batch, seq, c["joint_attention_dim"]).astype(np.float32)
    pooled = rs.randn(batch, c["pooled_projection_dim"]).astype(np.float32)
    t = np.array([3.5, 870.25][:batch], np.float32)
    return x, ctx, pooled, t


def _ref(tm, inputs):
    with torch.no_grad():
        return tm(*(torch.from_numpy(a) for a in inputs), return_dict=False)[0].numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@nnx.jit
def _fwd(model, x, ctx, pooled, t):
    return model(x, ctx, pooled, t)


def _abstract(cfg, **kw):
    """A weightless model (filled by ``_load`` / ``nnx.update``): no eager random init."""
    return nnx.eval_shape(lambda: SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0), **kw))


def _init(cfg, **kw):
    """A randomly initialised model (jitted init)."""
    return nnx.jit(lambda: SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0), **kw))()


@functools.cache
def _pair(name):
    """(name, torch model, SD3Config, loaded Flax model), shared by the tests of this module."""
    tm = _torch_model(name)
    cfg = SD3Config.from_dict(dict(tm.config), source=f"tiny {name}")
    return name, tm, cfg, _load(_abstract(cfg), tm.state_dict())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return _pair(request.param)


def test_fp32_parity(pair):
    name, tm, _, fm = pair
    for size in SIZES[name]:
        inputs = _inputs(name, size)
        ref = _ref(tm, inputs)
        out = _fwd(fm, *inputs)
        assert out.shape == ref.shape == (2, 4, *size)
        err = _rel(out, ref)
        print(f"[{name} {size}] fp32 rel max err {err:.2e}")
        assert err <= FP32_TOL, (name, size, err)

def test_scalar_timestep():
    name, tm, _, fm = _pair("sd35m")
    x, ctx, pooled, _ = _inputs(name, SIZES[name][0])
    ref = _ref(tm, (x, ctx, pooled, np.full((2,), 500.0, np.float32)))
    assert _rel(_fwd(fm, x, ctx, pooled, np.float32(500.0)), ref) <= FP32_TOL


@pytest.mark.parametrize("name", ["sd3m", "sd35m"])
def test_bf16_compute(name):
    name, tm, cfg, fm = _pair(name)
    bm = _abstract(cfg, dtype=jnp.bfloat16)
    nnx.update(bm, nnx.state(fm))
    inputs = _inputs(name, SIZES[name][0])
    out = _fwd(bm, *inputs)
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bm, nnx.Param)))
    err = _rel(out, _ref(tm, inputs))
    print(f"[{name}] bf16-compute rel max err {err:.2e}")
    assert err <= BF16_TOL, (name, err)
    assert err > 0  # really computed in bf16


@pytest.mark.parametrize("name", ["sd3m", "sd35m"])
def test_scan_matches_loop(name):
    name, _, cfg, fm = _pair(name)
    sm = _abstract(cfg, scan_layers=True, remat_policy="dots_saveable")
    stacked = stack_state(nnx.state(fm), cfg)
    nnx.update(sm, stacked)
    inputs = _inputs(name, SIZES[name][-1], seed=3)
    a, b = _fwd(fm, *inputs), _fwd(sm, *inputs)
    err = _rel(b, a)
    print(f"[{name}] scan vs loop rel max err {err:.2e}")
    assert err <= 1e-6
    # leading "layers" axis and round trip back to per-layer paths
    groups = cfg.block_groups()
    k = nnx.state(sm)["transformer_block_groups"][0]["attn"]["to_q"]["kernel"]
    assert k.shape[0] == groups[0][1] and k.get_metadata()["out_sharding"][0] == "layers"
    back = unstack_state(nnx.state(sm), cfg)
    ref_flat = dict(nnx.to_flat_state(nnx.state(fm)))
    back_flat = dict(nnx.to_flat_state(back))
    assert set(ref_flat) == set(back_flat)
    for p, v in ref_flat.items():
        np.testing.assert_array_equal(np.asarray(back_flat[p].get_value()), np.asarray(v.get_value()))
        assert back_flat[p].get_metadata()["out_sharding"] == v.get_metadata()["out_sharding"], p


def test_remat_same_output_and_grad():
    """remat (loop "full", scan "nothing_saveable") changes neither the loss nor its gradient."""
    name = "sd35m"
    cfg = SD3Config.from_dict(dict(CONFIGS[name], num_layers=2))
    inputs = [jnp.asarray(a) for a in _inputs(name, (8, 12))]
    ref_state = nnx.state(_init(cfg))
    outs, grads = [], []
    for scan, policy in ((False, "none"), (True, "nothing_saveable")):
        m = _abstract(cfg, scan_layers=scan, remat_policy=policy)
        nnx.update(m, stack_state(ref_state, cfg) if scan else ref_state)
        gd, params = nnx.split(m, nnx.Param)

        def loss(p, gd=gd):
            return jnp.mean(nnx.merge(gd, p)(*inputs) ** 2)

        val, g = jax.jit(jax.value_and_grad(loss))(params)
        outs.append(val)
        grads.append(unstack_state(g, cfg) if scan else g)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[1], grads[0])
    assert float(jnp.max(jnp.abs(grads[0]["transformer_blocks"][0]["attn"]["to_q"]["kernel"][...]))) > 0
    # loop model with full remat: same forward output
    m = _abstract(cfg, remat_policy="full")
    nnx.update(m, ref_state)
    full = _fwd(m, *inputs)
    m0 = _abstract(cfg)
    nnx.update(m0, ref_state)
    np.testing.assert_allclose(np.asarray(full), np.asarray(_fwd(m0, *inputs)), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="remat_policy"):
        SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0), remat_policy="sometimes")


def test_lora():
    name = "sd35m"
    tm = _torch_model(name)
    cfg = SD3Config.from_dict(dict(tm.config))
    lora = LoRAConfig(rank=4, alpha=8, target_modules=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                        "add_k_proj", "add_v_proj", "to_add_out", "ff.net.2"))
    lm = _load(_init(cfg, lora=lora), tm.state_dict())
    paths = lora_paths(lm)
    assert "transformer_blocks.0.attn.to_out.0" in paths and "transformer_blocks.0.attn2.to_q" in paths
    assert "transformer_blocks.1.ff.net.2" in paths  # suffix match on the diffusers path ...
    assert "transformer_blocks.1.ff_context.net.2" not in paths  # ... on dotted boundaries only
    assert not any("net.0" in p or "norm" in p or "context_embedder" in p for p in paths)
    assert not any(p.endswith("3.attn.to_add_out") for p in paths)  # pre-only block has none
    a = nnx.state(lm, LoRAParam)["transformer_blocks"][0]["attn"]["to_q"]["lora_a"].get_value()
    assert a.shape == (16, 4) and 0.1 < float(jnp.std(a)) < 0.5  # Gaussian, std 1/r = 0.25
    inputs = _inputs(name, (8, 12))
    ref = _ref(tm, inputs)
    # zero B: identical to the base model
    assert _rel(_fwd(lm, *inputs), ref) <= FP32_TOL
    gd, lstate, base = split_lora(lm)
    assert count_lora_params(lstate) > 0
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(lstate))

    def bump(path, x):
        return x + 0.05 if any(getattr(k, "key", None) == "lora_b" for k in path) else x

    nonzero = jax.tree_util.tree_map_with_path(bump, lstate)
    out = _fwd(nnx.merge(gd, nonzero, base), *inputs)
    assert _rel(out, ref) > 1e-3
    # the nonzero adapter equals folding B A * alpha/r into the kernels
    folded = _load(_abstract(cfg), tm.state_dict())
    fs = nnx.state(folded)
    for path, v in nnx.to_flat_state(nonzero):
        if path[-1] != "lora_b":
            continue
        mod = path[:-1]
        a = dict(nnx.to_flat_state(nonzero))[mod + ("lora_a",)].get_value()
        kernel = fs
        for k in mod:
            kernel = kernel[k]
        kernel["kernel"].set_value(kernel["kernel"].get_value() + a @ v.get_value() * lora.scale)
    nnx.update(folded, fs)
    assert _rel(out, _fwd(folded, *inputs)) <= 1e-5
    # zero_lora restores the base output exactly
    assert _rel(_fwd(nnx.merge(gd, zero_lora(nonzero), base), *inputs), ref) <= FP32_TOL
    # scan + LoRA: the adapters stack too
    sm = _abstract(cfg, lora=lora, scan_layers=True)
    nnx.update(sm, stack_state(nnx.state(nnx.merge(gd, nonzero, base)), cfg))
    assert _rel(_fwd(sm, *inputs), out) <= 1e-6
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_every_param_has_sharding_names():
    known = {n for n, _ in LOGICAL_AXIS_RULES} | {None}
    cfg = SD3Config.from_dict(CONFIGS["sd35m"])
    lora = LoRAConfig(rank=2, alpha=2)
    for scan in (False, True):
        m = nnx.eval_shape(lambda scan=scan: SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0), lora=lora,
                                                                    scan_layers=scan))
        n = 0
        for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            names = v.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(v.shape), (path, names, v.shape)
            assert set(names) <= known, (path, names)
            assert (scan and path[0] == "transformer_block_groups") == (names[0] == "layers"), (path, names)
            n += 1
        assert n > 50


def test_config_from_dict_and_errors():
    d = dict(CONFIGS["sd35m"], _class_name="SD3Transformer2DModel", _diffusers_version="0.42.1",
             _name_or_path="x")
    cfg = SD3Config.from_dict(d)
    assert cfg.dual_attention_layers == (0, 1) and cfg.block_groups() == [(0, 2, (True, False)),
                                                                           (2, 1, (False, False)),
                                                                           (3, 1, (False, True))]
    assert SD3Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus_key"):
        SD3Config.from_dict(dict(d, bogus_key=1), source="cfg.json")
    with pytest.raises(ValueError, match="qk_norm"):
        SD3Config.from_dict(dict(d, qk_norm="l2"))
    m = _abstract(cfg)
    x, ctx, pooled, t = _inputs("sd35m", (8, 12))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        m(np.zeros((2, 4, 18, 18), np.float32), ctx, pooled, t)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        m(x, ctx[..., :8], pooled, t)
    with pytest.raises(ValueError, match="divisible"):
        m(x[..., :7], ctx, pooled, t)


@pytest.mark.parametrize("targets", ["family", "bare"])
def test_lora_targets_follow_peft(targets):
    """The adapted layers and LoRA parameter count equal what PEFT injects into the diffusers model for the
    same target list (PEFT's rule: full name == target or ends with "." + target). The family default (the
    public AWM / Flow-GRPO list ``attn.*``) leaves the dual-attention ``attn2`` alone; bare names adapt it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    from awm_jax.models.mmdit import SD3Family

    tm = _torch_model("sd35m")
    cfg = SD3Config.from_dict(dict(tm.config))
    bare = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    tlist = SD3Family.lora_targets if targets == "family" else bare
    peft_model = inject_adapter_in_model(PeftLoraConfig(r=4, lora_alpha=8, target_modules=list(tlist)), tm)
    peft_paths = {n[:-len(".lora_A")] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    peft_count = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    lm = _abstract(cfg, lora=LoRAConfig(rank=4, alpha=8, target_modules=tlist))
    assert set(lora_paths(lm)) == peft_paths
    assert count_lora_params(nnx.state(lm, LoRAParam)) == peft_count
    has_attn2 = any(".attn2." in p for p in peft_paths)
    assert has_attn2 == (targets == "bare")
    # 4 blocks x 8 projections, minus the pre-only last block's to_add_out; bare names add 2 x 4 of attn2
    assert len(peft_paths) == (31 if targets == "family" else 39)
