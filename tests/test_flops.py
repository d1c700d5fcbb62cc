"""The jaxpr FLOP counter (``awm_jax.flops``): exact on hand-counted programs, loop trip counts included, and
in agreement with XLA's own count where XLA's is right (a program without loops)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from awm_jax.flops import jaxpr_flops, traced_flops
from awm_jax.models.family import get_family
from tests.toy_tiny import tiny_toy_config


def test_hand_counted_program():
    a, b, c = 4, 8, 16
    x, w = jnp.ones((a, b)), jnp.ones((b, c))
    img, k = jnp.ones((2, 3, 10, 10)), jnp.ones((5, 3, 3, 3))  # NCHW, OIHW, 'SAME': 2x5x10x10 outputs

    def f(x, w, img, k):
        def body(carry, _):
            return jnp.tanh(carry @ jnp.ones((b, b))), None
        y, _ = jax.lax.scan(body, x, None, length=7)  # 7 x (a x b x b)
        conv = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME")
        return (y @ w).sum() + conv.sum()

    got = traced_flops(jax.jit(f), x, w, img, k)
    want = 7 * 2 * a * b * b + 2 * a * b * c + 2 * (2 * 5 * 10 * 10) * (3 * 3 * 3)
    assert got.flops == want and got.uncounted_loops == 0
    # the gradient w.r.t. w: forward + the two matmuls of each transposed dot (only those that feed w's grad)
    g = traced_flops(jax.jit(jax.grad(lambda w, x: (jnp.tanh(x @ w)).sum())), w, x)
    assert g.flops == 2 * (2 * a * b * c)  # x @ w forward, x^T @ dy backward (x needs no gradient)


def test_while_loop_with_dynamic_trip_count_is_reported():
    def f(x, n):
        return jax.lax.while_loop(lambda s: s[1] < n, lambda s: (s[0] @ s[0], s[1] + 1), (x, 0))[0]

    got = traced_flops(jax.jit(f), jnp.ones((4, 4)), 3)
    assert got.uncounted_loops == 1 and got.flops == 2 * 4 * 4 * 4  # the body once


@pytest.fixture(scope="module")
def tiny_forward():
    fam = get_family("sd35")
    cfg = fam.config_from_dict(tiny_toy_config(num_layers=3)["transformer"])

    def make(scan):
        model = nnx.eval_shape(lambda: fam.build(cfg, rngs=nnx.Rngs(0), scan_layers=scan))
        gdef, state = nnx.split(model)

        @jax.jit
        def fwd(state, x, c, p, t):
            return nnx.merge(gdef, state)(x, c, p, t)
        args = (state, jax.ShapeDtypeStruct((2, cfg.in_channels, 8, 8), jnp.float32),
                jax.ShapeDtypeStruct((2, 5, 16), jnp.float32), jax.ShapeDtypeStruct((2, 12), jnp.float32),
                jax.ShapeDtypeStruct((2,), jnp.float32))
        return fwd, args
    return make


def test_scanned_layers_count_like_unrolled_ones(tiny_forward):
    fwd, args = tiny_forward(False)
    unrolled = traced_flops(fwd, *args).flops
    xla_unrolled = fwd.trace(*args).lower().compile().cost_analysis()["flops"]
    # no loops: XLA's count (which also has the element-wise work) is at most a little above ours
    assert 1.0 <= xla_unrolled / unrolled < 1.5, (xla_unrolled, unrolled)
    fwd_s, args_s = tiny_forward(True)
    scanned = traced_flops(fwd_s, *args_s)
    assert scanned.flops == pytest.approx(unrolled, rel=1e-9) and scanned.uncounted_loops == 0


def test_closed_and_open_jaxprs():
    closed = jax.make_jaxpr(lambda x: x @ x)(jnp.ones((3, 3)))
    assert jaxpr_flops(closed).flops == jaxpr_flops(closed.jaxpr).flops == 2 * 27
