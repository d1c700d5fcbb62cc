"""A checkpoint written on one mesh restores onto another (1 <-> 4 devices, (data, fsdp) = (4, 1) <-> (2, 2)),
through the trainer's own ``checkpoint_items`` / ``restore_checkpoint`` (8 fake CPU devices)."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awm_jax import parallel, train
from awm_jax.checkpoint import Checkpointer


@flax.struct.dataclass
class _State:
    step: jax.Array
    trainable: nnx.State


def _state(seed: int):
    class M(nnx.Module):
        def __init__(self):
            k = jax.random.key(seed)
            self.w = nnx.Param(jax.random.normal(k, (8, 6)), sharding_names=("embed", "mlp"))
            self.b = nnx.Param(jnp.arange(8.0) + seed, sharding_names=("embed",))

    return _State(jnp.asarray(0, jnp.int32), nnx.state(M()))


MESHES = {"1dev": dict(data=1, fsdp=1, devices=jax.devices()[:1]),
          "4x1": dict(data=4, fsdp=1, devices=jax.devices()[:4]),
          "2x2": dict(data=2, fsdp=2, devices=jax.devices()[:4]),
          "1x4": dict(data=1, fsdp=4, devices=jax.devices()[:4])}


@pytest.mark.parametrize("src,dst", [("1dev", "4x1"), ("4x1", "1dev"), ("4x1", "2x2"), ("2x2", "4x1"),
                                     ("1x4", "1dev")])
def test_restore_onto_another_mesh(tmp_path, src, dst):
    cfg = train.config_lib.ml_collections.ConfigDict({"seed": 0})
    m_src, m_dst = parallel.make_mesh(**MESHES[src]), parallel.make_mesh(**MESHES[dst])
    saved = _state(1)
    saved = saved.replace(trainable=parallel.shard_model_state(saved.trainable, m_src))
    rng = jax.random.key(42)
    ck = Checkpointer(str(tmp_path), async_save=True)
    ck.save(3, train.checkpoint_items(saved, rng, {"step": 3, "data_position": 3}, cfg, m_src))
    ck.close()  # waits for the asynchronous save
    ck = Checkpointer(str(tmp_path))
    step, state, rng2, meta = train.restore_checkpoint(ck, _state(2), jax.random.key(0), mesh=m_dst)
    ck.close()
    assert step == 3 and meta["step"] == 3
    np.testing.assert_array_equal(jax.random.key_data(rng2), jax.random.key_data(rng))
    for a, b in zip(jax.tree.leaves(saved.trainable), jax.tree.leaves(state.trainable)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        assert b.sharding.mesh.devices.size == m_dst.devices.size
    w = state.trainable["w"].get_value()
    want = parallel.logical_to_spec(("embed", "mlp"), w.shape, m_dst)
    assert w.sharding.spec == want
    if dst == "2x2":  # the restored weight is split over fsdp: no device holds the whole array
        assert all(s.data.shape == (4, 6) for s in w.addressable_shards)
