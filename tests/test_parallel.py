"""Mesh construction, the logical-axis rule table and sharding a tiny MMDiT over 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from awm_jax import parallel
from awm_jax.models.lora import LoRAConfig
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel

CFG = SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,),
                qk_norm="rms_norm")


def test_make_mesh_shapes_and_errors():
    assert len(jax.devices()) == 8
    m = parallel.make_mesh(data=-1, fsdp=2, tensor=2)
    assert m.axis_names == parallel.MESH_AXES and dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="fsdp\\*tensor=3"):
        parallel.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="!= 8 devices"):
        parallel.make_mesh(data=2, fsdp=2, tensor=1)


def test_logical_to_spec_rules():
    m = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert parallel.logical_to_spec(("embed", "heads"), (16, 16), m) == PartitionSpec("fsdp", "tensor")
    assert parallel.logical_to_spec(("layers", "mlp", "embed"), (3, 64, 16), m) == PartitionSpec(
        None, "tensor", "fsdp")
    # a mesh axis is used once per array; indivisible dims are replicated
    assert parallel.logical_to_spec(("embed", "embed"), (16, 16), m) == PartitionSpec("fsdp", None)
    assert parallel.logical_to_spec(("embed", "mlp"), (15, 64), m) == PartitionSpec(None, "tensor")
    assert parallel.logical_to_spec(("batch", None), (8, 3), m) == PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'bogus'"):
        parallel.logical_to_spec(("bogus",), (4,), m)


def test_sharded_model_same_output(scan=True):
    """fsdp=2, tensor=2, data=2: the scanned model with LoRA gives the unsharded output."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    lora = LoRAConfig(rank=2, alpha=4)
    model = nnx.jit(lambda: SD3Transformer2DModel(CFG, rngs=nnx.Rngs(0), lora=lora, scan_layers=scan))()
    gd, state = nnx.split(model)
    rs = np.random.RandomState(0)
    x = rs.randn(4, 4, 8, 12).astype(np.float32)
    ctx = rs.randn(4, 5, 16).astype(np.float32)
    pooled = rs.randn(4, 12).astype(np.float32)
    t = np.array([1.0, 250.0, 500.0, 999.0], np.float32)

    @jax.jit
    def fwd(s, *a):
        return nnx.merge(gd, s)(*a)

    ref = np.asarray(fwd(state, x, ctx, pooled, t))
    shardings = parallel.logical_to_mesh_sharding(state, mesh)
    sharded = parallel.shard_model_state(state, mesh)
    flat_sh = dict(nnx.to_flat_state(shardings))
    n_split = 0
    for path, v in nnx.to_flat_state(sharded):
        arr = v.get_value()
        assert arr.sharding == flat_sh[path].get_value(), path
        n_split += int(any(a is not None for a in arr.sharding.spec))
    assert n_split > 20  # most kernels are really split over fsdp / tensor
    q = nnx.to_flat_state(sharded)
    k = dict(q)[("transformer_block_groups", 0, "attn", "to_q", "kernel") if scan
                else ("transformer_blocks", 0, "attn", "to_q", "kernel")].get_value()
    assert tuple(k.sharding.spec)[-2:] == ("fsdp", "tensor")
    bs = parallel.batch_sharding(mesh, 4)
    xs = jax.device_put(jnp.asarray(x), bs)
    ctxs = jax.device_put(jnp.asarray(ctx), parallel.batch_sharding(mesh, 3))
    out = fwd(sharded, xs, ctxs, pooled, t)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(bs, NamedSharding) and bs.spec[0] == ("data", "fsdp")


def test_process_allgather_single_host():
    mesh = parallel.make_mesh()
    x = jax.device_put(jnp.arange(16.0).reshape(8, 2), parallel.batch_sharding(mesh, 2))
    g = parallel.process_allgather({"x": x})
    assert isinstance(g["x"], np.ndarray) and g["x"].shape == (8, 2) and g["x"][7, 1] == 15.0
    assert parallel.is_main_process()
