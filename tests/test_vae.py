"""Flax AutoencoderKL vs diffusers on tiny random configs; VAE key map round trip and errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import awm_jax  # noqa: F401  (flax settings)
from awm_jax import convert
from awm_jax.convert.keymap import ConversionError
from awm_jax.models.vae import (
    DiagonalGaussian,
    VAEConfig,
    images_uint8_to_latents,
    load_vae,
    make_decode_fn,
)

LAYOUTS = {  # name -> (latent_channels, quant convs, shift_factor)
    "sd3": (16, False, 0.0609),
    "classic": (4, True, None),
}


def _tiny_diffusers_vae(latent_channels, quant, shift, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        latent_channels=latent_channels, use_quant_conv=quant, use_post_quant_conv=quant,
        scaling_factor=1.5305, shift_factor=shift, sample_size=16).eval()
    with torch.no_grad():  # move norms/biases away from their (1, 0) init so they are exercised
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


_PAIRS = {}


def _pair(name, tmp_path_factory):
    if name not in _PAIRS:
        lc, quant, shift = LAYOUTS[name]
        ref = _tiny_diffusers_vae(lc, quant, shift)
        folder = tmp_path_factory.mktemp(f"vae_{name}")
        ref.save_pretrained(folder)
        _PAIRS[name] = (name, ref, load_vae(folder), folder)
    return _PAIRS[name]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def pair(request, tmp_path_factory):
    """(layout name, diffusers vae, Flax vae loaded from its save_pretrained folder, folder)."""
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd3_pair(tmp_path_factory):
    """The 16-channel SD3/FLUX-layout pair only (for the tests that need one layout)."""
    return _pair("sd3", tmp_path_factory)


def test_encode_decode_parity(pair):
    name, ref, vae, _ = pair
    lc = LAYOUTS[name][0]
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    z = rng.randn(2, lc, 8, 12).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        dec = ref.decode(torch.from_numpy(z)).sample.numpy()
    ours = nnx.jit(lambda m, x: m.encode(x))(vae, jnp.asarray(x))
    assert ours.mean.shape == (2, lc, 8, 12)
    assert _rel(ours.mean, post.mean.numpy()) <= 1e-5
    assert _rel(ours.logvar, post.logvar.numpy()) <= 1e-5
    assert _rel(ours.kl(), post.kl().numpy()) <= 1e-5
    out = nnx.jit(lambda m, z: m.decode(z))(vae, jnp.asarray(z))
    assert out.shape == (2, 3, 16, 24)
    assert _rel(out, dec) <= 1e-5
    # posterior samples: reproducible per key, distinct across keys, mean + std * eps
    s1, s2 = ours.sample(jax.random.key(1)), ours.sample(jax.random.key(2))
    np.testing.assert_array_equal(s1, ours.sample(jax.random.key(1)))
    post = DiagonalGaussian(mean=ours.mean[:, :1], logvar=ours.logvar[:, :1])  # a plain pytree
    assert jax.tree.leaves(post)[0].shape == (2, 1, 8, 12)
    assert float(jnp.abs(s1 - s2).max()) > 0
    eps = (s1 - ours.mean) / ours.std
    assert abs(float(eps.std()) - 1.0) < 0.2


def test_latents_to_images_uint8_matches_diffusers_postprocess(pair):
    from diffusers.image_processor import VaeImageProcessor

    name, ref, vae, _ = pair
    lc = LAYOUTS[name][0]
    latents = np.random.RandomState(3).randn(2, lc, 8, 8).astype(np.float32)
    scaling, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    with torch.no_grad():  # what StableDiffusion3Pipeline does for output_type="np"
        img = ref.decode(torch.from_numpy(latents) / scaling + shift).sample
    want = VaeImageProcessor().postprocess(img, output_type="np")
    want = (want * 255).round().astype(np.uint8)
    got = np.asarray(make_decode_fn(vae)(jnp.asarray(latents)))
    assert got.dtype == np.uint8 and got.shape == (2, 16, 16, 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_decode_fn_sharded(sd3_pair):
    _, _, vae, _ = sd3_pair
    latents = jnp.asarray(np.random.RandomState(4).randn(8, 16, 4, 4).astype(np.float32))
    jitted = np.asarray(make_decode_fn(vae)(latents))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    out = make_decode_fn(vae, mesh)(latents)
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert np.abs(np.asarray(out).astype(int) - jitted.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="nope"):
        make_decode_fn(vae, mesh, data_axes="nope")


def test_params_have_logical_axis_names(pair):
    _, _, vae, _ = pair
    allowed = {None, "conv_in", "conv_out", "embed", "heads", "norm"}
    for path, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        meta = v.get_metadata()
        names = meta.get("sharding_names", meta.get("out_sharding"))
        assert names is not None and len(names) == v.get_value().ndim, path
        assert set(names) <= allowed, (path, names)


def test_images_uint8_to_latents(sd3_pair):
    _, ref, vae, _ = sd3_pair
    images = np.random.RandomState(6).randint(0, 256, (2, 16, 8, 3)).astype(np.uint8)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = (ref.encode(x).latent_dist.mean - ref.config.shift_factor) * ref.config.scaling_factor
    got = nnx.jit(images_uint8_to_latents)(vae, jnp.asarray(images))
    assert got.shape == (2, 16, 8, 4)
    assert _rel(got, want.numpy()) <= 1e-5


def test_bfloat16_compute(sd3_pair):
    _, ref, _, folder = sd3_pair
    vae = load_vae(folder, dtype=jnp.bfloat16)
    z = np.random.RandomState(5).randn(1, 16, 4, 4).astype(np.float32)
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z)).sample.numpy()
    got = nnx.jit(lambda m, z: m.decode(z))(vae, jnp.asarray(z))
    assert got.dtype == jnp.bfloat16
    assert _rel(got.astype(jnp.float32), want) <= 5e-2
    assert vae.decoder.conv_in.kernel.get_value().dtype == jnp.float32  # storage stays as loaded


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bit_exact(tmp_path, dtype):
    from safetensors import safe_open

    ref = _tiny_diffusers_vae(16, False, 0.0609, seed=1).to(getattr(torch, dtype))
    ref.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline-style folder
    convert.to_flax(tmp_path / "pipe", tmp_path / "flax", "vae")
    cfg = json.loads((tmp_path / "flax" / "config.json").read_text())
    assert cfg["awm_jax"]["format"] == "flax" and cfg["awm_jax"]["model"] == "vae"
    convert.to_diffusers(tmp_path / "flax", tmp_path / "back", "vae")
    orig = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
    back = tmp_path / "back" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(orig), "pt") as a, safe_open(str(back), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype == getattr(torch, dtype), k
            assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), k  # bitwise
    # the exported folder loads in diffusers with identical weights
    from diffusers import AutoencoderKL

    again = AutoencoderKL.from_pretrained(tmp_path / "back", torch_dtype=getattr(torch, dtype))
    for (k, a), (_, b) in zip(ref.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # Flax folder and diffusers folder load to the same model
    flat_a = nnx.to_flat_state(nnx.state(load_vae(tmp_path / "flax"), nnx.Param))
    flat_b = nnx.to_flat_state(nnx.state(load_vae(tmp_path / "pipe"), nnx.Param))
    for (pa, va), (pb, vb) in zip(flat_a, flat_b, strict=True):
        assert pa == pb
        assert va.get_value().dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def _resave_without(folder, drop=None, add=None, reshape=None):
    from safetensors.torch import load_file, save_file

    f = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    if drop:
        del sd[drop]
    if add:
        sd[add] = torch.zeros(3)
    if reshape:
        sd[reshape] = sd[reshape].reshape(-1)
    save_file(sd, str(f))


@pytest.mark.parametrize("case,key,match", [
    ("missing", "decoder.up_blocks.1.resnets.0.conv1.weight", "missing"),
    ("extra", "encoder.bogus.weight", "unexpected"),
    ("shape", "encoder.conv_in.weight", r"shape \(216,\), expected \(8, 3, 3, 3\)"),
])
def test_conversion_errors_name_the_key(tmp_path, case, key, match):
    _tiny_diffusers_vae(16, False, 0.0609).save_pretrained(tmp_path)
    _resave_without(tmp_path, **{{"missing": "drop", "extra": "add", "shape": "reshape"}[case]: key})
    with pytest.raises(ConversionError, match=match) as e:
        load_vae(tmp_path)
    assert key in str(e.value)
    with pytest.raises(ConversionError, match=match):
        convert.to_flax(tmp_path, tmp_path / "out", "vae")


def test_config_errors(tmp_path):
    with pytest.raises(ConversionError, match="nowhere"):
        load_vae(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unsupported block types"):
        VAEConfig(down_block_types=("CrossAttnDownBlock2D",))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ConversionError, match="UNet2DModel"):
        load_vae(tmp_path)
    with pytest.raises(ConversionError, match="unknown model 'vea'"):
        convert.to_flax(tmp_path, tmp_path / "out", "vea")


def test_convert_weights_cli_model_vae(tmp_path, capsys):
    import importlib.util
    import pathlib

    from safetensors.torch import load_file

    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "convert_weights.py"
    spec = importlib.util.spec_from_file_location("convert_weights_cli", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    _tiny_diffusers_vae(4, True, None, seed=2).save_pretrained(tmp_path / "vae")
    run = lambda cmd, src, dst: cli.main([cmd, "--model", "vae", "--src", str(src), "--dst", str(dst)])  # noqa: E731
    assert run("to-flax", tmp_path / "vae", tmp_path / "f") == 0
    assert run("to-diffusers", tmp_path / "f", tmp_path / "d") == 0
    a = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "d" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    flax_keys = load_file(str(tmp_path / "f" / "model.safetensors")).keys()
    assert "encoder.mid_block.attentions.0.to_out.0.kernel" in flax_keys and "quant_conv.kernel" in flax_keys
    # converting a Flax folder "to-flax" again is a one-line error, exit status 2
    assert run("to-flax", tmp_path / "f", tmp_path / "x") == 2
    assert "Flax" in capsys.readouterr().err
