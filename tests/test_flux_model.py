"""Parity of the Flax NNX FLUX.1 transformer with diffusers' ``FluxTransformer2DModel`` (tiny random models),
scan / remat / LoRA / sharding names, input errors, and the ``FluxFamily`` (packing, ids, grid)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax.models.family import family_of, get_family
from awm_jax.models.flux import (
    FLUX_LORA_TARGETS,
    FluxConfig,
    FluxFamily,
    FluxTransformer2DModel,
    rope_tables,
    stacks,
)
from awm_jax.models.lora import LoRAConfig, LoRAParam, lora_paths, split_lora, zero_lora
from awm_jax.models.stacking import stack_state, unstack_state
from awm_jax.parallel import LOGICAL_AXIS_RULES
from tests.flux_oracle import exact_timestep_embedding, oracle

BASE = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
CONFIGS = {
    "dev": dict(BASE, guidance_embeds=True),
    "schnell": dict(BASE, guidance_embeds=False),
    # patch_size 2 / explicit out_channels only change proj_out's width (the model never unpatchifies)
    "odd": dict(BASE, patch_size=2, out_channels=6, num_layers=1, num_single_layers=2,
                axes_dims_rope=(2, 8, 6)),
}
EXTRA = {"small": dict(BASE, num_layers=1, num_single_layers=2)}  # remat gradients (compile time)
# (packed grid h2 x w2, text length): non-square both ways, two text lengths
CASES = [((2, 3), 5), ((3, 2), 7)]
FP32_TOL = 1e-5
RAW_TOL = 5e-5  # vs pristine diffusers (torch's not correctly rounded exp): see exact_timestep_embedding
BF16_TOL = 3e-2


def _config(name):
    return CONFIGS[name] if name in CONFIGS else EXTRA[name]


def _torch_model(name):
    from diffusers import FluxTransformer2DModel as TorchFlux

    torch.manual_seed(sum(map(ord, name)))
    m = TorchFlux(**_config(name)).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith(".weight") and p.ndim == 1:  # RMSNorm scales: away from 1 to test the mapping
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return m


def _load(model, torch_sd):
    """Test-local loader: diffusers state_dict -> Flax model (loop layout, non-LoRA params)."""
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


def _ids(h2, w2, t):
    img = np.zeros((h2, w2, 3), np.float32)
    img[..., 1], img[..., 2] = np.arange(h2)[:, None], np.arange(w2)[None, :]
    return img.reshape(-1, 3), np.zeros((t, 3), np.float32)


def _inputs(name, grid, t_len, batch=2, seed=0):
    c = _config(name)
    rs = np.random.RandomState(seed)
    s = grid[0] * grid[1]
    img_ids, txt_ids = _ids(*grid, t_len)
    return dict(
        hidden_states=rs.randn(batch, s, c["in_channels"]).astype(np.float32),
        encoder_hidden_states=rs.randn(batch, t_len, c["joint_attention_dim"]).astype(np.float32),
        pooled_projections=rs.randn(batch, c["pooled_projection_dim"]).astype(np.float32),
        timestep=np.array([0.25, 0.875, 0.5][:batch], np.float32),
        img_ids=img_ids, txt_ids=txt_ids,
        guidance=np.array([3.5, 1.5, 2.0][:batch], np.float32) if c.get("guidance_embeds") else None)


def _ref(tm, inputs, exact_freqs=True):
    kw = {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with oracle(exact_freqs):
        return tm(**kw, return_dict=False)[0].numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@nnx.jit
def _fwd(model, inputs):
    return model(**inputs)  # ids are traced here: the on-device float32 rotary path


def _abstract(cfg, **kw):
    return nnx.eval_shape(lambda: FluxTransformer2DModel(cfg, rngs=nnx.Rngs(0), **kw))


@functools.cache
def _pair(name):
    tm = _torch_model(name)
    cfg = FluxConfig.from_dict(dict(tm.config), source=f"tiny {name}")
    return name, tm, cfg, _load(_abstract(cfg), tm.state_dict())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return _pair(request.param)


def test_fp32_parity(pair):
    name, tm, cfg, fm = pair
    for grid, t_len in CASES:
        inputs = _inputs(name, grid, t_len)
        ref = _ref(tm, inputs)
        out = _fwd(fm, inputs)
        assert out.shape == ref.shape == (2, grid[0] * grid[1], cfg.patch_size ** 2 * cfg.out_ch)
        err = _rel(out, ref)
        raw = _rel(out, _ref(tm, inputs, exact_freqs=False))  # pristine diffusers, torch's exp
        print(f"[{name} grid {grid} T={t_len}] fp32 rel max err {err:.2e} (unpatched oracle {raw:.2e})")
        assert err <= FP32_TOL and raw <= RAW_TOL, (name, grid, err, raw)
    # concrete ids (host float64 rotary), deprecated 3-D ids, scalar timestep
    inputs = _inputs(name, *CASES[0])
    ref = _ref(tm, dict(inputs, timestep=np.full((2,), 0.625, np.float32)))
    ids = dict(img_ids=np.stack([inputs.pop("img_ids")] * 2), txt_ids=inputs.pop("txt_ids")[None])
    out = nnx.jit(lambda m, kw: m(**kw, **ids))(fm, dict(inputs, timestep=np.float32(0.625)))
    assert _rel(out, ref) <= FP32_TOL


def test_exact_frequency_oracle_is_diffusers_formula():
    """The patched oracle differs from diffusers' ``get_timestep_embedding`` only by exp's last ulp."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.37, 1.0, 2.5])  # small arguments: 1 ulp of a frequency is invisible here
    for dim, shift in ((256, 0.0), (255, 1.0)):
        a = exact_timestep_embedding(t, dim, True, shift)
        b = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=shift)
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    big = torch.tensor([3500.0])
    assert float((exact_timestep_embedding(big, 256, True, 0) - get_timestep_embedding(big, 256, True, 0))
                 .abs().max()) < 1e-3


def test_rope_tables_match_diffusers():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = np.random.RandomState(0).randint(0, 64, size=(40, 3)).astype(np.float32)
    with torch.no_grad():
        cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.from_numpy(ids))
    host = rope_tables(ids, (16, 56, 56))
    traced = jax.jit(lambda i: rope_tables(i, (16, 56, 56)))(ids)
    for got, want in zip(host, (cos.numpy(), sin.numpy())):
        np.testing.assert_array_equal(np.asarray(got), want)  # float64 on host, exactly diffusers
    for got, want in zip(traced, (cos.numpy(), sin.numpy())):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_bf16_compute(name):
    name, tm, cfg, fm = _pair(name)
    bm = _abstract(cfg, dtype=jnp.bfloat16)
    nnx.update(bm, nnx.state(fm))
    inputs = _inputs(name, *CASES[1])
    out = _fwd(bm, inputs)
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bm, nnx.Param)))
    err = _rel(out, _ref(tm, inputs))
    print(f"[{name}] bf16-compute rel max err {err:.2e}")
    assert 0 < err <= BF16_TOL, (name, err)


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_scan_matches_loop(name):
    name, _, cfg, fm = _pair(name)
    sm = _abstract(cfg, scan_layers=True, remat_policy="dots_saveable")
    nnx.update(sm, stack_state(nnx.state(fm), stacks(cfg)))
    inputs = _inputs(name, *CASES[0], seed=3)
    err = _rel(_fwd(sm, inputs), _fwd(fm, inputs))
    print(f"[{name}] scan vs loop rel max err {err:.2e}")
    assert err <= 1e-6
    state = nnx.state(sm)
    k = state["transformer_block_groups"][0]["attn"]["add_q_proj"]["kernel"]
    assert k.shape[0] == cfg.num_layers and k.get_metadata()["out_sharding"][0] == "layers"
    k = state["single_transformer_block_groups"][0]["proj_out"]["kernel"]
    assert k.shape == (cfg.num_single_layers, 5 * cfg.inner_dim, cfg.inner_dim)
    back = dict(nnx.to_flat_state(unstack_state(state, stacks(cfg))))
    ref = dict(nnx.to_flat_state(nnx.state(fm)))
    assert set(back) == set(ref)
    for p, v in ref.items():
        np.testing.assert_array_equal(np.asarray(back[p].get_value()), np.asarray(v.get_value()))
        assert back[p].get_metadata()["out_sharding"] == v.get_metadata()["out_sharding"], p


def test_remat_same_output_and_grad():
    """remat (scan "nothing_saveable", loop "full") changes neither the loss nor its gradient."""
    name, _, cfg, fm = _pair("small")
    inputs = {k: None if v is None else jnp.asarray(v) for k, v in _inputs(name, *CASES[0]).items()}
    ref_state = nnx.state(fm)
    outs, grads = [], []
    for scan, policy in ((True, "nothing_saveable"), (False, "none")):
        m = _abstract(cfg, scan_layers=scan, remat_policy=policy)
        nnx.update(m, stack_state(ref_state, stacks(cfg)) if scan else ref_state)
        gd, params = nnx.split(m, nnx.Param)

        def loss(p, gd=gd):
            return jnp.mean(nnx.merge(gd, p)(**inputs) ** 2)

        val, g = jax.jit(jax.value_and_grad(loss))(params)
        outs.append(val)
        grads.append(unstack_state(g, stacks(cfg)) if scan else g)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[0], grads[1])
    assert float(jnp.max(jnp.abs(grads[1]["single_transformer_blocks"][1]["proj_mlp"]["kernel"][...]))) > 0
    full = _abstract(cfg, remat_policy="full")
    nnx.update(full, ref_state)
    assert _rel(_fwd(full, inputs), _fwd(fm, inputs)) <= 1e-6
    with pytest.raises(ValueError, match="remat_policy"):
        _abstract(cfg, remat_policy="sometimes")


def _expected_lora_paths(cfg):
    double = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2")
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
    return ({f"transformer_blocks.{i}.{m}" for i in range(cfg.num_layers) for m in double}
            | {f"single_transformer_blocks.{i}.{m}" for i in range(cfg.num_single_layers) for m in single})


def _with_adapters(model, seed=0):
    """Concrete adapter values for an abstract model: ``lora_a`` Gaussian (std 1/r), ``lora_b`` zeros."""
    rs = np.random.RandomState(seed)
    flat = [(p, v.replace(value=jnp.asarray(rs.randn(*v.shape) / v.shape[-1] if p[-1] == "lora_a"
                                            else np.zeros(v.shape), jnp.float32)))
            for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))]
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def test_lora_targets_and_zero_b():
    name, tm, cfg, fm = _pair("dev")
    assert get_family("flux").lora_targets == FLUX_LORA_TARGETS
    lora = LoRAConfig(rank=4, alpha=8, target_modules=FLUX_LORA_TARGETS)
    lm = _with_adapters(_load(_abstract(cfg, lora=lora), tm.state_dict()))
    paths = set(lora_paths(lm))
    assert paths == _expected_lora_paths(cfg)
    assert "proj_out" not in paths and not any("norm" in p or "embed" in p for p in paths)
    inputs = _inputs(name, *CASES[0])
    base = _fwd(fm, inputs)
    assert _rel(_fwd(lm, inputs), base) <= 1e-6  # B = 0: the base model (up to XLA re-association)
    gd, lstate, rest = split_lora(lm)

    def bump(path, x):
        return x + 0.05 if any(getattr(k, "key", None) == "lora_b" for k in path) else x

    nonzero = jax.tree_util.tree_map_with_path(bump, lstate)
    out = _fwd(nnx.merge(gd, nonzero, rest), inputs)
    assert _rel(out, base) > 1e-3
    assert _rel(_fwd(nnx.merge(gd, zero_lora(nonzero), rest), inputs), base) <= 1e-6
    # scan + the same targets: adapters stack with the blocks
    sm = _abstract(cfg, lora=lora, scan_layers=True)
    assert set(lora_paths(sm)) >= {"single_transformer_block_groups.0.proj_out",
                                   "transformer_block_groups.0.attn.to_add_out"}
    nnx.update(sm, stack_state(nnx.state(nnx.merge(gd, nonzero, rest)), stacks(cfg)))
    assert _rel(_fwd(sm, inputs), out) <= 1e-6
    # targets that adapt only some layers of a stack cannot be scanned
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.\{1\}\.proj_out"):
        _abstract(cfg, lora=LoRAConfig(rank=2, target_modules=("single_transformer_blocks.1.proj_out",)),
                  scan_layers=True)


def test_every_param_has_sharding_names():
    known = {n for n, _ in LOGICAL_AXIS_RULES} | {None}
    cfg = FluxConfig.from_dict(CONFIGS["dev"])
    lora = LoRAConfig(rank=2, alpha=2, target_modules=FLUX_LORA_TARGETS)
    for scan in (False, True):
        m = _abstract(cfg, lora=lora, scan_layers=scan)
        n = 0
        for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            names = v.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(v.shape), (path, names, v.shape)
            assert set(names) <= known, (path, names)
            assert (scan and path[0].endswith("_groups")) == (names[0] == "layers"), (path, names)
            n += 1
        assert n > 40


def test_config_and_input_errors():
    d = dict(CONFIGS["dev"], _class_name="FluxTransformer2DModel", _diffusers_version="0.42.1",
             out_channels=None)
    cfg = FluxConfig.from_dict(d)
    assert FluxConfig.from_dict(cfg.to_dict()) == cfg and cfg.out_ch == 16 and cfg.inner_dim == 32
    with pytest.raises(ValueError, match="bogus_key"):
        FluxConfig.from_dict(dict(d, bogus_key=1), source="cfg.json")
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig.from_dict(dict(d, axes_dims_rope=(4, 6, 8)))
    m = _pair("dev")[3]
    good = _inputs("dev", *CASES[0])
    bad = [
        (dict(hidden_states=good["hidden_states"][..., :8]),
         r"hidden_states shape \(2, 6, 8\) must be \(B, S, 16\)"),
        (dict(encoder_hidden_states=good["encoder_hidden_states"][..., :4]),
         r"encoder_hidden_states .* \(2, T, 24\)"),
        (dict(pooled_projections=good["pooled_projections"][:1]), r"pooled_projections .* must be \(2, 12\)"),
        (dict(img_ids=good["img_ids"][:4]), r"img_ids shape \(4, 3\) must be \(6, 3\)"),
        (dict(txt_ids=np.zeros((5, 2), np.float32)), r"txt_ids shape \(5, 2\) must be \(5, 3\)"),
        (dict(timestep=np.zeros((3,), np.float32)), r"timestep shape \(3,\) must be \(2,\)"),
        (dict(guidance=None), "guidance_embeds=True"),
        (dict(img_ids=None), "img_ids is required"),
    ]
    for change, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            m(**dict(good, **change))
    s = _pair("schnell")[3]
    with pytest.raises(ValueError, match="no guidance embedding"):
        s(**dict(_inputs("schnell", *CASES[0]), guidance=np.ones((2,), np.float32)))


# ------------------------------------------------------------------------------------------ family


def test_family_velocity_matches_diffusers_packed():
    from diffusers import FluxPipeline

    fam = get_family("flux")
    assert isinstance(fam, FluxFamily) and family_of(_pair("dev")[3]) is fam
    for name in ("dev", "schnell"):
        _, tm, cfg, fm = _pair(name)
        rs = np.random.RandomState(7)
        b, h, w, t_len = 2, 6, 4, 5  # unpacked latent 6x4 -> packed grid 3x2
        x = rs.randn(b, 4, h, w).astype(np.float32)
        emb = rs.randn(b, t_len, cfg.joint_attention_dim).astype(np.float32)
        pooled = rs.randn(b, cfg.pooled_projection_dim).astype(np.float32)
        t = np.array([0.9, 0.2], np.float32)
        vel = jax.jit(lambda x, t, e, p, fm=fm: fam.velocity(fm, x, t, (e, p), guidance=3.5))
        vel = vel(x, t, emb, pooled)
        assert vel.shape == x.shape and vel.dtype == jnp.float32
        packed = FluxPipeline._pack_latents(torch.from_numpy(x), b, 4, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        with oracle():
            out = tm(hidden_states=packed, encoder_hidden_states=torch.from_numpy(emb),
                     pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                     img_ids=img_ids, txt_ids=torch.zeros(t_len, 3),
                     guidance=torch.full((b,), 3.5) if cfg.guidance_embeds else None, return_dict=False)[0]
        ref = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).numpy()
        err = _rel(vel, ref)
        print(f"[{name}] family velocity rel max err {err:.2e}")
        assert err <= FP32_TOL, (name, err)
    with pytest.raises(ValueError, match="guidance"):
        fam.velocity(_pair("dev")[3], x, t, (emb, pooled))
    with pytest.raises(ValueError, match=r"latents shape \(2, 4, 5, 4\)"):
        fam.velocity(_pair("schnell")[3], x[:, :, :5], t, (emb, pooled))


def test_family_shapes_grid_and_options():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    fam = get_family("flux")
    cfg = fam.config_from_dict(fam.architecture("flux.1-dev"))
    assert cfg.guidance_embeds
    assert not fam.config_from_dict(fam.architecture("flux.1-schnell")).guidance_embeds
    assert fam.latent_shape(cfg, 512, 768) == (16, 64, 96)
    with pytest.raises(ValueError, match="multiple of 16"):
        fam.latent_shape(cfg, 520, 512)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    for n, (lh, lw) in ((4, (64, 64)), (28, (128, 96)), (10, (32, 48))):
        seq = (lh // 2) * (lw // 2)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq, 256, 4096, 0.5, 1.15))
        grid = fam.time_grid(n, 0.0, (16, lh, lw))  # shift 0: dynamic (FLUX.1-dev's scheduler)
        assert grid.shape == (n + 1,) and grid[-1] == 0
        np.testing.assert_allclose(grid, sched.sigmas.numpy(), rtol=0, atol=1e-6)
    from awm_jax import config_lib

    tc = config_lib.load_config("configs/toy.py")  # any trainer config: model.guidance is a declared key
    tc.model.guidance = 2.5
    assert fam.velocity_options(tc) == {"guidance": 2.5}
    grouped = [s.grouped for s in fam.stacks(cfg)]
    assert grouped == ["transformer_block_groups", "single_transformer_block_groups"]
    assert fam.stacks(cfg)[1].groups == ((0, 38),)
    assert fam.pipeline_loader == "awm_jax.pipelines.flux:load_flux_pipeline"
    static = fam.time_grid(4, 1.0, (16, 8, 8))  # FLUX.1-schnell's static shift 1: the plain sigmas
    np.testing.assert_allclose(static, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-12)


def test_full_size_architectures_match_diffusers():
    """The named architectures build (abstractly) with diffusers' parameter shapes and count."""
    from diffusers import FluxTransformer2DModel as TorchFlux

    fam = get_family("flux")
    for arch in ("flux.1-dev", "flux.1-schnell"):
        d = fam.architecture(arch)
        with torch.device("meta"):
            sd = TorchFlux(**d).state_dict()
        m = nnx.eval_shape(lambda d=d: fam.build(fam.config_from_dict(d), rngs=nnx.Rngs(0), scan_layers=True))
        n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
        assert n == sum(v.numel() for v in sd.values()), arch
        assert fam.rebuild_kwargs(m)["cfg"] == m.config and m.scan_layers
