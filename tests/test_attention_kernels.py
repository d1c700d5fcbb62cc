"""The attention kernels (``model.attention``, awm_jax/models/attention.py): the Pallas splash kernel (run in
interpret mode on CPU) equals the XLA path in values and gradients, for SD3's joint attention and FLUX's
context-first attention with RoPE, at lengths that are no block multiple, with and without a mesh
(``shard_map`` over batch and heads); the block rule; ``auto`` per platform; the key reaches every block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awm_jax import parallel
from awm_jax.models import attention as attn_lib
from awm_jax.models.blocks import Attention
from awm_jax.models.family import get_family


def test_splash_block_rule_for_our_lengths():
    assert attn_lib.splash_block(1024 + 333) == (512, 1536)  # SD3.5 at 512 px: 9 % over 1408
    assert attn_lib.splash_block(1024 + 512) == (512, 1536)  # FLUX at 512 px
    assert attn_lib.splash_block(4096 + 512) == (512, 4608)  # FLUX at 1024 px
    assert attn_lib.splash_block(4096 + 333) == (512, 4608)  # SD3.5 at 1024 px: 3 % over 4480
    assert attn_lib.splash_block(37) == (128, 128)


def test_auto_picks_per_platform(monkeypatch):
    assert attn_lib.resolve("auto") == "xla"  # CPU
    monkeypatch.setattr(attn_lib, "platform", lambda mesh=None: "tpu")
    assert attn_lib.resolve("auto") == "splash"
    monkeypatch.setattr(attn_lib, "platform", lambda mesh=None: "gpu")
    assert attn_lib.resolve("auto", jnp.bfloat16) == "cudnn"
    assert attn_lib.resolve("auto", jnp.float32) == "xla"  # cuDNN's flash kernel is 16-bit only
    with pytest.raises(ValueError, match="model.attention = 'flash'"):
        attn_lib.resolve("flash")
    with pytest.raises(ValueError, match="16-bit"):
        attn_lib.dot_product_attention(*(jnp.ones((1, 4, 1, 8)),) * 3, implementation="cudnn")


def _ctx(seed=0):
    return {"dtype": jnp.float32, "param_dtype": jnp.float32, "rngs": nnx.Rngs(seed), "lora": None}


def _parity(module, args, kernel, mesh=None):
    """Values and gradients (inputs and parameters) of ``module(*args)`` with ``kernel`` vs XLA."""
    graphdef, params = nnx.split(module)

    def loss(p, xs, impl):
        m = nnx.merge(graphdef, p)
        for _, sub in m.iter_modules():
            if isinstance(sub, Attention):
                sub.attention_kernel = impl
        out = m(*xs)
        outs = [o for o in out if o is not None]
        # a fixed random projection of every output: all of them reach the gradient
        return sum(jnp.sum(o * jnp.sin(jnp.arange(o.size).reshape(o.shape))) for o in outs), outs

    def run(impl):
        with parallel.activation_mesh(mesh):
            fn = jax.jit(jax.value_and_grad(lambda p, xs: loss(p, xs, impl), argnums=(0, 1), has_aux=True))
            return fn(params, args)

    (va, outs_a), ga = run(kernel)
    (vb, outs_b), gb = run("xla")
    for a, b in zip(outs_a, outs_b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    assert np.isfinite(float(va)) and abs(float(va) - float(vb)) < 1e-3
    return outs_a


def test_sd3_joint_attention_splash_equals_xla():
    # SD3: [sample, context] order, RMS q/k norms on both streams, output projections; 9 + 5 = 14 tokens
    attn = Attention(16, 2, 8, "attn", _ctx(), qk_norm_kind="rms_norm", joint=True)
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    c = jax.random.normal(jax.random.key(2), (2, 5, 16))
    outs = _parity(attn, (x, c), "splash")
    assert outs[0].shape == (2, 9, 16) and outs[1].shape == (2, 5, 16)


def test_flux_rope_attention_splash_equals_xla_on_a_mesh():
    # FLUX: [context, sample] order with 3-axis RoPE over the joint sequence (3 + 8 = 11 tokens); the splash
    # call runs inside shard_map over the 8 CPU devices (batch on data x fsdp, heads on tensor)
    from awm_jax.models.flux import rope_tables

    attn = Attention(16, 2, 8, "attn", _ctx(3), qk_norm_kind="rms_norm", joint=True, context_first=True)
    ids = np.concatenate([np.zeros((3, 3)), np.stack([np.zeros(8), np.arange(8) // 4, np.arange(8) % 4], 1)])
    rotary = rope_tables(ids.astype(np.float32), (2, 2, 4))
    x = jax.random.normal(jax.random.key(4), (4, 8, 16))
    c = jax.random.normal(jax.random.key(5), (4, 3, 16))
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)

    class WithRope(nnx.Module):
        def __init__(self, a):
            self.a = a

        def __call__(self, x, c):
            return self.a(x, c, rotary=rotary)

    _parity(WithRope(attn), (x, c), "splash", mesh=mesh)


def test_the_config_key_reaches_every_attention_block():
    fam = get_family("sd35")
    cfg = fam.config_from_dict(dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                    caption_projection_dim=16,
                                    pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                    dual_attention_layers=(0,), qk_norm="rms_norm"))
    model = nnx.eval_shape(lambda: fam.build(cfg, rngs=nnx.Rngs(0), scan_layers=True, attention="splash"))
    kernels = [m.attention_kernel for _, m in model.iter_modules() if isinstance(m, Attention)]
    assert len(kernels) == 4 and set(kernels) == {"splash"}  # 3 groups: dual (attn, attn2), plain, last
    assert model.attention == "splash" and fam.rebuild_kwargs(model)["attention"] == "splash"


def test_splash_flops_are_counted_from_shapes():
    # awm_jax.flops: a pallas_call is its body's matmuls x its grid: the forward is 4 B H Lq Lk D at the
    # padded length, the fused backward 2.5x that; all in kernel_flops (XLA cannot cost a Mosaic call)
    from awm_jax.flops import jaxpr_flops

    b, n, h, d = 2, 200, 2, 16
    q = jnp.ones((b, n, h, d))
    def splash(q):
        return attn_lib.dot_product_attention(q, q, q, implementation="splash")

    fwd = jaxpr_flops(jax.make_jaxpr(splash)(q))
    grad = jaxpr_flops(jax.make_jaxpr(jax.grad(lambda q: splash(q).sum()))(q))
    padded = attn_lib.splash_block(n)[1]
    assert fwd.flops == fwd.kernel_flops == 4 * b * h * padded * padded * d and fwd.kernels == 1
    assert grad.kernel_flops == 3.5 * fwd.flops and grad.kernels == 2
