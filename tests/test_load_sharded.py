"""``load_transformer(..., mesh=...)``: weights read shard by shard straight onto the mesh (issue 15 item 4).

On the 8 fake CPU devices with fsdp = 8, a tiny SD3.5 (diffusers and converted Flax folders, per-layer and
scanned, with LoRA) and a tiny FLUX (scanned): every sharded parameter's addressable shards are each 1/8 of
it, the values equal the unsharded load bit for bit, and -- watching every ``jax.device_put`` and every
shard the loader reads -- no full-size array of a sharded parameter is ever placed on a device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax import parallel
from awm_jax.convert import to_flax
from awm_jax.models import LoRAConfig, load_transformer

SD35 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
            dual_attention_layers=(0,))
FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
            guidance_embeds=True)


def _save(cls, config, path):
    torch.manual_seed(0)
    m = cls(**config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    d = tmp_path_factory.mktemp("sharded_load")
    sd3 = _save(SD3Transformer2DModel, SD35, d / "sd3")
    to_flax(sd3, d / "sd3_flax", "sd3")
    return {"sd3": sd3, "sd3_flax": d / "sd3_flax", "flux": _save(FluxTransformer2DModel, FLUX, d / "flux")}


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    return parallel.make_mesh(data=1, fsdp=8)


CASES = [("sd3", {}), ("sd3", {"scan_layers": True}), ("sd3_flax", {"scan_layers": True}),
         ("sd3", {"lora": LoRAConfig(rank=2, alpha=2.0)}), ("flux", {"scan_layers": True})]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{'-'.join(k) or 'plain'}" for n, k in CASES])
def test_weights_are_born_sharded_and_equal_the_unsharded_load(folders, mesh, name, kwargs, monkeypatch):
    family = "flux" if name == "flux" else None
    ref = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(
        load_transformer(folders[name], family=family, **kwargs)))}

    placed: list[tuple] = []  # shapes of everything device_put / asarray'd during the sharded load
    shards: dict[int, list] = {}  # id(global array) -> shapes of the host shards its callback returned
    real_put, real_asarray, real_make = jax.device_put, jnp.asarray, jax.make_array_from_callback

    def put(x, *a, **k):
        placed.extend(np.shape(leaf) for leaf in jax.tree.leaves(x))
        return real_put(x, *a, **k)

    def asarray(x, *a, **k):
        placed.append(np.shape(x))
        return real_asarray(x, *a, **k)

    def make(shape, sharding, cb, *a, **k):
        seen = []

        def watched(index):
            out = cb(index)
            seen.append(out.shape)
            return out
        arr = real_make(shape, sharding, watched, *a, **k)
        shards[id(arr)] = seen
        return arr

    monkeypatch.setattr(jax, "device_put", put)
    monkeypatch.setattr(jnp, "asarray", asarray)
    monkeypatch.setattr(jax, "make_array_from_callback", make)
    model = load_transformer(folders[name], family=family, mesh=mesh, **kwargs)
    monkeypatch.undo()

    got = dict(nnx.to_flat_state(nnx.state(model)))
    assert got.keys() == ref.keys()
    sharded = 0
    for p, var in got.items():
        x = var[...]
        assert np.array_equal(np.asarray(x), ref[p]), p  # exactly the unsharded values
        assert isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh, p
        if x.sharding.is_fully_replicated:
            continue
        sharded += 1
        assert len(x.addressable_shards) == 8
        for s in x.addressable_shards:  # each device holds 1/8, never the whole parameter
            assert s.data.size * 8 == x.size, (p, s.data.shape, x.shape)
        assert tuple(x.shape) not in placed or x.ndim == 0, (p, x.shape)
        read = shards.get(id(x), [])
        assert read or "lora" in str(p[-1])  # base weights go through the callback, LoRA through jit
        assert all(int(np.prod(r)) * 8 == x.size for r in read), (p, read)
    assert sharded >= 10, sharded  # the embed axis of every linear kernel is sharded over fsdp = 8
    full_shapes = {tuple(v[...].shape) for v in got.values() if not v[...].sharding.is_fully_replicated}
    assert not full_shapes & set(placed), full_shapes & set(placed)


def test_without_mesh_the_old_path_stays(folders):
    model = load_transformer(folders["sd3"])
    x = nnx.state(model)["proj_out"]["kernel"][...]
    assert x.sharding.is_fully_replicated and len(x.devices()) == 1
