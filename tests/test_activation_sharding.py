"""Activation constraints (``mesh.constrain_activations``, ``awm_jax.parallel.constrain``) in the compiled HLO
of a small scanned SD3 over 8 CPU devices with fsdp 4: the FSDP-sharded stacked weights are never all-gathered
whole (every all-gather is of one layer's slice), and the constraints are in the program."""

import re

import jax
import jax.numpy as jnp
from flax import nnx

from awm_jax import parallel
from awm_jax.models.family import get_family


def test_no_whole_stack_all_gather_with_fsdp_4():
    fam = get_family("sd35")
    cfg = fam.config_from_dict(dict(sample_size=8, patch_size=2, in_channels=4, num_layers=5,
                                    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                    caption_projection_dim=64,
                                    pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                    qk_norm="rms_norm"))
    graphdef, state = nnx.split(fam.build(cfg, rngs=nnx.Rngs(0), scan_layers=True))
    mesh = parallel.make_mesh(data=2, fsdp=4)
    st = parallel.shard_model_state(state, mesh)
    # the stacked kernels (layers, in, out) of the 4-layer scanned group (the last block is its own group)
    stacked = {tuple(v.shape) for _, v in nnx.to_flat_state(state)
               if v.shape[:1] == (cfg.num_layers - 1,) and len(v.shape) == 3}
    assert (4, 64, 384) in stacked and (4, 64, 256) in stacked  # adaLN-Zero linear, MLP in: embed on fsdp

    def fwd(s, x, c, p, t):
        return nnx.merge(graphdef, s)(x, c, p, t)

    args = [jnp.ones((8, 4, 8, 8)), jnp.ones((8, 8, 32)), jnp.ones((8, 16)), jnp.ones((8,))]
    args = [jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in args]
    with parallel.activation_mesh(mesh, constrain=True):
        hlo = jax.jit(fwd).trace(st, *args).lower().compile().as_text()
    gathered = [tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)]
    assert gathered, "fsdp 4 must gather weights"
    assert not [g for g in gathered if g in stacked], f"whole stacked weights gathered: {gathered}"
    assert (64, 384) in gathered and (64, 256) in gathered  # one layer's slice at a time, inside the loop
