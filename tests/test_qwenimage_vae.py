"""Qwen-Image's causal 3-D VAE in Flax (single frame) against diffusers' ``AutoencoderKLQwenImage`` on tiny
random configs: key map, bit-exact round trip, decode / encode parity, the pipeline's latent normalisation."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage as TorchVAE

from awm_jax.convert import ConversionError, qwenimage_vae, to_diffusers, to_flax
from awm_jax.convert.io import SafetensorsReader
from awm_jax.models.qwenimage_vae import latents_to_images_uint8, load_qwenimage_vae

# one temporal and one spatial-only resampler each way (attn_scales stays empty: diffusers' own encoder fails
# with down-path attention blocks, it passes them the feature cache)
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True],
    latents_mean=[0.1, -0.2, 0.3, 0.05],
    latents_std=[1.5, 0.7, 2.0, 1.1],
)
TOL = 1e-5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    torch.manual_seed(0)
    tm = TorchVAE(**TINY).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            p.copy_(
                (1.0 + 0.3 * torch.randn_like(p)) if name.endswith("gamma") else 0.2 * torch.randn_like(p)
            )
    d = tmp_path_factory.mktemp("qvae") / "vae"
    tm.save_pretrained(d)
    return tm, d, load_qwenimage_vae(d)


def test_key_map_matches_diffusers():
    for cfg in (TINY, {}):
        with torch.device("meta"):
            sd = TorchVAE(**cfg).state_dict()
        km = qwenimage_vae.key_map(cfg)
        assert sorted(km.diffusers_keys()) == sorted(sd)
        for r in km.rules:
            assert r.diffusers_shape == tuple(sd[r.diffusers_key].shape), r.diffusers_key
    with pytest.raises(ConversionError, match="temperal_downsample"):
        qwenimage_vae.key_map(dict(TINY, temperal_downsample=[True]))


def test_round_trip_bit_exact(tmp_path, vae_pair):
    _, d, _ = vae_pair
    to_flax(d, tmp_path / "flax", "qwenimage_vae")
    to_diffusers(tmp_path / "flax", tmp_path / "back", "qwenimage_vae")
    with SafetensorsReader(d) as a, SafetensorsReader(tmp_path / "back") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get(k).tobytes() == b.get(k).tobytes() for k in a.keys())
    assert json.loads((tmp_path / "back/config.json").read_text()) == json.loads(
        (d / "config.json").read_text()
    )
    assert load_qwenimage_vae(tmp_path / "flax").config == vae_pair[2].config


def test_decode_encode_parity_and_normalisation(vae_pair):
    tm, _, fm = vae_pair
    rs = np.random.RandomState(0)
    z = rs.randn(2, 4, 1, 6, 5).astype(np.float32)
    with torch.no_grad():
        ref = tm.decode(torch.from_numpy(z)).sample.numpy()
    out = fm.decode(z)
    assert out.shape == (2, 3, 24, 20) and ref.shape == (2, 3, 1, 24, 20)
    err = _rel(out, ref[:, :, 0])
    print(f"decode fp32 rel max err {err:.2e}")
    assert err <= TOL
    x = np.clip(rs.randn(2, 3, 1, 16, 24).astype(np.float32) * 0.5, -1, 1)
    with torch.no_grad():
        post = tm.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = fm.encode(x)
    e1, e2 = _rel(mean, post.mean[:, :, 0].numpy()), _rel(logvar, post.logvar[:, :, 0].numpy())
    print(f"encode fp32 rel max err mean {e1:.2e} logvar {e2:.2e}")
    assert e1 <= TOL and e2 <= TOL
    # the pipeline's decode: latents / (1 / std) + mean, vae.decode, postprocess to [0, 1]
    lat = rs.randn(2, 4, 6, 5).astype(np.float32)
    m = torch.tensor(TINY["latents_mean"]).view(1, 4, 1, 1, 1)
    s = 1.0 / torch.tensor(TINY["latents_std"]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        img = tm.decode(torch.from_numpy(lat)[:, :, None] / s + m).sample[:, :, 0]
    want = np.round(np.clip(img.numpy() * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    got = np.asarray(latents_to_images_uint8(fm, lat))
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
    np.testing.assert_allclose(fm.normalize(fm.denormalize(jnp.asarray(lat))), lat, atol=1e-5)
    with pytest.raises(ValueError, match="single frames"):
        fm.decode(np.zeros((1, 4, 2, 6, 5), np.float32))
