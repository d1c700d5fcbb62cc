"""Flow-GRPO's CFG in training: the unconditional branch is detached (reference: noise_pred_uncond.detach()).

Pinned against the same computation written directly in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from awm_jax.sampling.samplers import classifier_free_guidance

SCALE = 4.5


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in
            dict(w=(6, 6), u=(5, 6), x=(4, 6), c=(4, 5), n=(4, 5), r=(4, 6)).items()}


def _torch_grad(d, detach: bool) -> np.ndarray:
    w = torch.tensor(d["w"], requires_grad=True)
    x, c, n, r = (torch.tensor(d[k]) for k in ("x", "c", "n", "r"))
    u = torch.tensor(d["u"])

    def model(cond):
        return torch.tanh(x @ w + cond @ u)

    v_u = model(n)
    if detach:
        v_u = v_u.detach()
    v = v_u + SCALE * (model(c) - v_u)
    (v * r).sum().backward()
    return w.grad.numpy()


def _jax_grad(d, detach: bool) -> np.ndarray:
    def model(w, xx, t, cond):
        return jnp.tanh(xx @ w + cond @ d["u"])

    def loss(w):
        f = classifier_free_guidance(lambda xx, t, cond: model(w, xx, t, cond), SCALE, detach_uncond=detach)
        return jnp.sum(f(d["x"], jnp.zeros(4), (d["c"], d["n"])) * d["r"])

    return np.asarray(jax.grad(loss)(jnp.asarray(d["w"])))


@pytest.mark.parametrize("detach", [True, False])
def test_cfg_gradient_matches_torch(data, detach):
    np.testing.assert_allclose(_jax_grad(data, detach), _torch_grad(data, detach), rtol=1e-5, atol=1e-5)


def test_detach_changes_gradient_not_value(data):
    g1, g0 = _jax_grad(data, True), _jax_grad(data, False)
    assert np.linalg.norm(g1 - g0) / np.linalg.norm(g0) > 0.1
    f = [classifier_free_guidance(lambda xx, t, cond: jnp.tanh(xx @ data["w"] + cond @ data["u"]), SCALE,
                                  detach_uncond=dt) for dt in (True, False)]
    args = (data["x"], jnp.zeros(4), (data["c"], data["n"]))
    np.testing.assert_array_equal(np.asarray(f[0](*args)), np.asarray(f[1](*args)))
