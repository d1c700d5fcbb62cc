"""XLA miscompiles on a mesh whose data, fsdp and tensor axes are all > 1 (jax 0.10.2, Shardy and GSPMD), so
the trainer refuses such meshes (``parallel.config_mesh``). The reproducer below is plain JAX: the batch on
``(data, fsdp)``, one weight on ``tensor``, one on ``(tensor, fsdp)`` (the rule table's layout of an adaLN
modulation and a feed-forward output). It is a strict xfail: when an XLA upgrade computes it right, this test
fails (XPASS) and the refusal in ``parallel.config_mesh`` can go."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from awm_jax import check, config_lib, parallel


def _repro(shape):
    b, d = 16, 8
    rng = np.random.default_rng(0)
    t, c = (jnp.asarray(rng.normal(size=(b, d)), jnp.float32) for _ in range(2))
    w1 = jnp.asarray(rng.normal(size=(d, 2 * d)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(d, d)), jnp.float32)

    def f(t, c, w1, w2):
        m = t @ w1
        return (c * m[:, :d]) @ w2 * m[:, d:]

    ref = np.asarray(jax.jit(f)(t, c, w1, w2))
    n = int(np.prod(shape))
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(shape), parallel.MESH_AXES)
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731
    out = np.asarray(jax.jit(f)(put(t, ("data", "fsdp"), None), put(c, ("data", "fsdp"), None),
                                put(w1, None, "tensor"), put(w2, "tensor", "fsdp")))
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("shape", [(2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 4, 1), (1, 2, 4)])
def test_two_axis_meshes_compute_correctly(shape):
    assert _repro(shape) < 1e-5


@pytest.mark.xfail(strict=True, reason="XLA SPMD miscompile on a data x fsdp x tensor mesh (jax 0.10.2): "
                                       "lift the refusal in parallel.config_mesh when this passes")
def test_three_axis_mesh_computes_correctly():
    assert _repro((2, 2, 2)) < 1e-5


def test_config_mesh_refuses_three_axes_and_check_says_why():
    cfg = config_lib.load_config("configs/toy.py")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 2, 2  # data resolves to 2
    with pytest.raises(ValueError, match="'mesh.tensor' = 2.*all > 1"):
        parallel.config_mesh(cfg)
    assert "tests/test_xla_three_axis_mesh.py" in check.mesh_problem(cfg)
    with pytest.warns(UserWarning, match="miscompiles"):
        parallel.make_mesh(data=2, fsdp=2, tensor=2)  # the library's own call only warns
    cfg.mesh.tensor = 1
    assert dict(parallel.config_mesh(cfg).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert check.mesh_problem(cfg) is None
