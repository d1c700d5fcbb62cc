"""Parity of the Flax NNX Z-Image transformer with diffusers' ``ZImageTransformer2DModel`` (tiny random
models: several grids, caption lengths, batch 2), scan / remat / LoRA / sharding names, input errors, and
the ``ZImageFamily`` (time and velocity conventions, grid)."""

import copy
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax.models.family import family_of, get_family
from awm_jax.models.lora import LoRAConfig, LoRAParam, lora_paths
from awm_jax.models.stacking import stack_state, unstack_state
from awm_jax.models.zimage import ZIMAGE_LORA_TARGETS, ZImageConfig, ZImageTransformer2DModel, stacks
from awm_jax.parallel import LOGICAL_AXIS_RULES

TINY = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=12, axes_dims=(4, 6, 6), axes_lens=(256, 32, 32))
# (latent H x W, caption lengths of the two samples): non-square both ways, equal / unequal lengths,
# a length past one 32-token block (the pad tokens and per-sample image positions differ)
CASES = [((4, 6), (5, 40)), ((6, 4), (7, 7)), ((2, 2), (33, 3))]
FP32_TOL = 1e-5
BF16_TOL = 6e-2  # bf16 compute, float32 parameters (and at most 3x diffusers' own bf16 error)


def exact_timestep_embedding(t, dim, max_period=10000):
    """Z-Image's ``TimestepEmbedder.timestep_embedding`` with correctly rounded frequencies: torch's float32
    CPU ``exp`` is 1 ulp off for a few of them, which ``cos(1000 t f)`` turns into ~1e-5 of the output (the
    Flax model's host frequencies are correctly rounded; see tests/flux_oracle.py)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
    freqs = torch.from_numpy(np.exp(exponent.numpy().astype(np.float64)).astype(np.float32))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def torch_tiny(seed=0, **overrides):
    """A tiny random diffusers Z-Image transformer with weights 0.12 N(0, 1) (RMSNorm scales 1 + 0.2 N)."""
    from diffusers import ZImageTransformer2DModel as TorchZImage

    torch.manual_seed(seed)
    m = TorchZImage(**dict(TINY, **overrides)).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if k.endswith(".weight") and p.ndim == 1
                    else 0.12 * torch.randn_like(p))
    return m


def load_flax(model, torch_sd):
    """Test-local loader: diffusers state_dict -> Flax model (loop layout, non-LoRA params)."""
    sd = {k: v.detach().numpy() for k, v in torch_sd.items()}
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))):
        mod, leaf = ".".join(map(str, path[:-1])), path[-1]
        name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
        w = sd.pop(f"{mod}.{name}" if mod else name)
        w = w.T if leaf == "kernel" else w
        assert w.shape == var.shape, (path, w.shape, var.shape)
        flat.append((path, var.replace(value=jnp.asarray(w, var.get_value().dtype))))
    assert not sd, f"unmapped torch keys: {sorted(sd)}"
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _abstract(cfg, **kw):
    return nnx.eval_shape(lambda: ZImageTransformer2DModel(cfg, rngs=nnx.Rngs(0), **kw))


@functools.cache
def _pair():
    tm = torch_tiny()
    cfg = ZImageConfig.from_dict(dict(tm.config), source="tiny")
    return tm, cfg, load_flax(_abstract(cfg), tm.state_dict())


def _inputs(grid, lens, seed=0, t_len=48):
    rs = np.random.RandomState(seed)
    x = rs.randn(len(lens), TINY["in_channels"], 1, *grid).astype(np.float32)
    caps = [rs.randn(n, TINY["cap_feat_dim"]).astype(np.float32) for n in lens]
    pad = np.zeros((len(lens), t_len, TINY["cap_feat_dim"]), np.float32)
    mask = np.zeros((len(lens), t_len), bool)
    for i, c in enumerate(caps):
        pad[i, :len(c)], mask[i, :len(c)] = c, True
    return x, np.array([0.3, 0.85][:len(lens)], np.float32), caps, pad, mask


def _ref(tm, x, t, caps, exact=True):
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        if exact:
            from diffusers.models.transformers import transformer_z_image as tz

            mp.setattr(tz.TimestepEmbedder, "timestep_embedding", staticmethod(exact_timestep_embedding))
        out = tm([torch.from_numpy(a) for a in x], torch.from_numpy(t), [torch.from_numpy(c) for c in caps],
                 return_dict=False)[0]
    return np.stack([o.numpy() for o in out])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@nnx.jit
def _fwd(model, x, t, cap, mask):
    return model(x, t, cap, mask)


@pytest.fixture(scope="module")
def pair():
    return _pair()


def test_fp32_parity(pair):
    tm, cfg, fm = pair
    for i, (grid, lens) in enumerate(CASES):
        x, t, caps, pad, mask = _inputs(grid, lens, seed=i)
        ref = _ref(tm, x, t, caps)
        out = _fwd(fm, x, t, pad, mask)  # padded captions + mask, jitted (the trainer's form)
        assert out.shape == ref.shape == (2, 4, 1, *grid)
        err = _rel(out, ref)
        print(f"[grid {grid} caption lengths {lens}] fp32 rel max err {err:.2e}")
        assert err <= FP32_TOL, (grid, lens, err)
    # diffusers' own call form (lists of images and of variable-length captions); pristine diffusers
    x, t, caps, _, _ = _inputs(*CASES[0], seed=0)
    out = nnx.jit(lambda m, x, t, c: m(x, t, c))(fm, list(x), t, caps)
    assert _rel(out, _ref(tm, x, t, caps)) <= FP32_TOL
    assert _rel(out, _ref(tm, x, t, caps, exact=False)) <= 5e-5


def test_bf16_compute(pair):
    tm, cfg, fm = pair
    bm = _abstract(cfg, dtype=jnp.bfloat16)
    nnx.update(bm, nnx.state(fm))
    x, t, caps, pad, mask = _inputs(*CASES[2], seed=5)
    out = _fwd(bm, x, t, pad, mask)
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bm, nnx.Param)))
    ref = _ref(tm, x, t, caps)
    err = _rel(out, ref)
    tb = copy.deepcopy(tm).to(torch.bfloat16)  # diffusers' own bf16 error, the yardstick
    with torch.no_grad():
        tout = tb([torch.from_numpy(a).to(torch.bfloat16) for a in x], torch.from_numpy(t),
                  [torch.from_numpy(c).to(torch.bfloat16) for c in caps], return_dict=False)[0]
    terr = _rel(np.stack([o.float().numpy() for o in tout]), ref)
    print(f"bf16-compute rel max err {err:.2e} (diffusers bf16: {terr:.2e})")
    assert 0 < err <= BF16_TOL and err <= 3 * terr, (err, terr)


def test_scan_remat_matches_loop_and_grads(pair):
    _, cfg, fm = pair
    x, t, _, pad, mask = _inputs(*CASES[0], seed=3)
    ref_state = nnx.state(fm)
    outs, grads = [], []
    for scan, policy in ((True, "nothing_saveable"), (False, "none")):
        m = _abstract(cfg, scan_layers=scan, remat_policy=policy)
        nnx.update(m, stack_state(ref_state, stacks(cfg)) if scan else ref_state)
        gd, params = nnx.split(m, nnx.Param)

        def loss(p, gd=gd):
            return jnp.mean(nnx.merge(gd, p)(x, t, pad, mask) ** 2)

        val, g = jax.jit(jax.value_and_grad(loss))(params)
        outs.append(val)
        grads.append(unstack_state(g, stacks(cfg)) if scan else g)
        if scan:
            k = nnx.state(m)["layers_groups"][0]["attention"]["to_q"]["kernel"]
            assert k.shape == (cfg.n_layers, cfg.dim, cfg.dim)
            assert k.get_metadata()["out_sharding"][0] == "layers"
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[0], grads[1])
    assert float(jnp.max(jnp.abs(grads[1]["context_refiner"][0]["feed_forward"]["w2"]["kernel"][...]))) > 0
    assert float(jnp.max(jnp.abs(grads[1]["cap_pad_token"][...]))) > 0  # the pad tokens are used


def test_sharding_names_and_lora(pair):
    _, cfg, fm = pair
    names = {n for n, _ in LOGICAL_AXIS_RULES} | {None}
    lora = LoRAConfig(rank=2, alpha=2.0, target_modules=ZIMAGE_LORA_TARGETS)
    for path, v in nnx.to_flat_state(nnx.state(_abstract(cfg, lora=lora))):
        meta = v.get_metadata().get("out_sharding")
        assert meta is not None and len(meta) == len(v.shape) and set(meta) <= names, (path, meta)
    lm = _abstract(cfg, lora=LoRAConfig(rank=2, alpha=2.0, target_modules=ZIMAGE_LORA_TARGETS))
    got = set(lora_paths(lm))
    want = {f"{s}.{i}.{m}" for s, n in (("noise_refiner", 1), ("context_refiner", 1), ("layers", 2))
            for i in range(n) for m in ZIMAGE_LORA_TARGETS}
    assert got == want
    assert get_family("zimage").lora_targets == ZIMAGE_LORA_TARGETS
    with pytest.raises(ValueError, match="not all"):
        _abstract(cfg, scan_layers=True,
                  lora=LoRAConfig(rank=2, alpha=2.0, target_modules=("layers.0.attention.to_q",)))


def test_family_velocity_units(pair):
    """v(x, t) = -model(x, 1 - t) on (B, C, h, w) latents with (embeds, mask) context; grid and shapes."""
    tm, cfg, fm = pair
    fam = family_of(fm)
    assert fam.name == "zimage" and fam.converter == "zimage"
    x, t, caps, pad, mask = _inputs(*CASES[1], seed=7)
    v = nnx.jit(lambda m, x, t, c: fam.velocity(m, x, t, c))(fm, x[:, :, 0], jnp.asarray(1.0 - t),
                                                            (pad, mask.astype(np.float32)))
    np.testing.assert_allclose(np.asarray(v), -_ref(tm, x, t, caps)[:, :, 0], rtol=0, atol=2e-5)
    assert fam.latent_shape(cfg, 32, 48) == (4, 4, 6)
    with pytest.raises(ValueError, match="multiple of 16"):
        fam.latent_shape(cfg, 40, 48)
    g = fam.time_grid(4, 3.0, (4, 4, 6))
    s = np.linspace(1, 0.25, 4)
    np.testing.assert_allclose(g, np.r_[3 * s / (1 + 2 * s), 0.0], rtol=1e-12)
    assert fam.time_grid(4, 0.0, (4, 64, 64))[1] > fam.time_grid(4, 0.0, (4, 8, 8))[1]  # dynamic shift


def test_input_errors(pair):
    _, cfg, fm = pair
    x, t, caps, pad, mask = _inputs(*CASES[0])
    with pytest.raises(ValueError, match=r"x shape .* must be"):
        fm(x[:, :3], t, caps)
    with pytest.raises(ValueError, match="cap_feats shape"):
        fm(x, t, pad[..., :5], mask)
    with pytest.raises(ValueError, match="patch_size"):
        fm(x, t, caps, patch_size=1)
    with pytest.raises(ValueError, match="exceed axes_lens"):
        fm(x, t, np.zeros((2, 300, 12), np.float32))
    for bad, match in ((dict(siglip_feat_dim=8), "SigLIP"), (dict(all_patch_size=(1, 2)), "several patch"),
                       (dict(axes_dims=(4, 6, 8)), "axes_dims"), (dict(bogus=1), "unknown")):
        with pytest.raises(ValueError, match=match):
            ZImageConfig.from_dict(dict(TINY, **bad))
