"""Activation constraints (``mesh.constrain_activations``, ``awm_jax.parallel.constrain``) in the compiled
HLO of a small scanned SD3 over 8 CPU devices: the FSDP-sharded stacked weights are never all-gathered whole
(every all-gather is of one layer's slice), the constraints are in the program, and the per-device
temporaries fall as the FSDP degree grows (a whole-stack gather would keep them at the stack's size)."""

import re

import jax
import jax.numpy as jnp
from flax import nnx

from awm_jax import parallel
from awm_jax.models.family import get_family


def _scanned_sd3(width: int, layers: int, sample: int):
    fam = get_family("sd35")
    cfg = fam.config_from_dict(dict(sample_size=sample, patch_size=2, in_channels=4, num_layers=layers,
                                    attention_head_dim=16, num_attention_heads=width // 16,
                                    joint_attention_dim=32,
                                    caption_projection_dim=width, pooled_projection_dim=16, out_channels=4,
                                    pos_embed_max_size=8, qk_norm="rms_norm"))
    graphdef, state = nnx.split(fam.build(cfg, rngs=nnx.Rngs(0), scan_layers=True))
    return cfg, graphdef, state


def _compile_forward(graphdef, state, mesh, sample: int, constrain: bool = True):
    # a new function per call: the constraints are read at trace time, which jit caches per function
    def fwd(s, x, c, p, t):
        return nnx.merge(graphdef, s)(x, c, p, t)

    st = parallel.shard_model_state(state, mesh)
    args = [jnp.ones((8, 4, sample, sample)), jnp.ones((8, 16, 32)), jnp.ones((8, 16)), jnp.ones((8,))]
    args = [jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in args]
    with parallel.activation_mesh(mesh, constrain=constrain):
        return jax.jit(fwd).trace(st, *args).lower().compile()


def test_no_whole_stack_all_gather_with_fsdp_4():
    cfg, graphdef, state = _scanned_sd3(width=64, layers=5, sample=8)
    # the stacked kernels (layers, in, out) of the 4-layer scanned group (the last block is its own group)
    stacked = {tuple(v.shape) for _, v in nnx.to_flat_state(state)
               if v.shape[:1] == (cfg.num_layers - 1,) and len(v.shape) == 3}
    assert (4, 64, 384) in stacked and (4, 64, 256) in stacked  # adaLN-Zero linear, MLP in: embed on fsdp
    hlo = _compile_forward(graphdef, state, parallel.make_mesh(data=2, fsdp=4), sample=8).as_text()
    gathered = [tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)]
    assert gathered, "fsdp 4 must gather weights"
    assert not [g for g in gathered if g in stacked], f"whole stacked weights gathered: {gathered}"
    assert (64, 384) in gathered and (64, 256) in gathered  # one layer's slice at a time, inside the loop


def test_constrained_temporaries_do_not_grow_with_fsdp():
    """FSDP alone over 2 / 4 / 8 devices, one global batch of 8: with the activation constraints the weights
    are gathered one layer at a time and the per-device temporaries fall from fsdp 2 to 4 and do not grow to
    8 (measured 1.55 / 1.08 / 1.08 MB), below what XLA picks unconstrained (2.12 / 1.96 / 1.93 MB); a
    whole-stack gather would add the stacked weights (3.6 MB) at every degree."""
    cfg, graphdef, state = _scanned_sd3(width=64, layers=7, sample=16)
    stack = sum(v.size * v.dtype.itemsize for _, v in nnx.to_flat_state(state)
                if v.shape[:1] == (cfg.num_layers - 1,))
    temps = {}
    for constrain in (True, False):
        for fsdp in (2, 4, 8):
            mesh = parallel.make_mesh(data=1, fsdp=fsdp, devices=jax.devices()[:fsdp])
            compiled = _compile_forward(graphdef, state, mesh, sample=16, constrain=constrain)
            temps[constrain, fsdp] = compiled.memory_analysis().temp_size_in_bytes
    on = [temps[True, f] for f in (2, 4, 8)]
    assert on[1] < on[0] and on[2] <= 1.02 * on[1], temps
    assert all(temps[True, f] < temps[False, f] for f in (2, 4, 8)), temps
    assert on[2] < stack, (temps, stack)
