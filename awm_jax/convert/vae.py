"""AutoencoderKL key map: diffusers ``AutoencoderKL`` <-> ``awm_jax.models.vae.AutoencoderKL``.

The map is declarative: ``module_map(config)`` lists every (diffusers module prefix, Flax module prefix,
kind) of the network, generated from the config; ``key_map(config)`` expands each module by its kind
(conv: ``weight`` OIHW <-> ``kernel`` HWIO; linear: ``weight`` (out, in) <-> ``kernel`` (in, out);
norm: ``weight`` <-> ``scale``; all: ``bias``) into invertible per-tensor rules with expected shapes.
The Flax module names mirror diffusers', so the prefixes coincide.

Flax folder format: ``config.json`` (the diffusers config plus ``"awm_jax": {"format": "flax",
"model": "vae"}``) and ``model.safetensors`` keyed by the dot-joined Flax parameter paths.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable

import numpy as np

from awm_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae, read_vae_config, resolve_vae_dir

MODEL_NAME = "vae"
FLAX_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class ConversionError(ValueError):
    """A missing, unexpected or mis-shaped tensor (the message names key, shapes and file)."""


@dataclasses.dataclass(frozen=True)
class Transpose:
    """Invertible axis permutation: ``forward`` diffusers -> Flax, ``inverse`` Flax -> diffusers."""

    perm: tuple[int, ...]

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(x, self.perm))

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(x, np.argsort(self.perm)))

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[i] for i in self.perm)


@dataclasses.dataclass(frozen=True)
class Identity:
    """The identity transform."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: diffusers key, Flax key (dot-joined path), transform, expected diffusers shape."""

    diffusers_key: str
    flax_key: str
    transform: Transpose | Identity
    diffusers_shape: tuple[int, ...]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.transform.forward_shape(self.diffusers_shape)


# (diffusers param, flax param, transform) per module kind
KINDS = {
    "conv": (("weight", "kernel", Transpose((2, 3, 1, 0))), ("bias", "bias", Identity())),
    "linear": (("weight", "kernel", Transpose((1, 0))), ("bias", "bias", Identity())),
    "norm": (("weight", "scale", Identity()), ("bias", "bias", Identity())),
}


def _resnet(prefix: str, cin: int, cout: int) -> list[tuple[str, str, tuple]]:
    mods = [(f"{prefix}.norm1", "norm", (cin,)), (f"{prefix}.conv1", "conv", (cout, cin, 3, 3)),
            (f"{prefix}.norm2", "norm", (cout,)), (f"{prefix}.conv2", "conv", (cout, cout, 3, 3))]
    if cin != cout:
        mods.append((f"{prefix}.conv_shortcut", "conv", (cout, cin, 1, 1)))
    return mods


def _mid(prefix: str, c: int, attention: bool) -> list[tuple[str, str, tuple]]:
    mods = _resnet(f"{prefix}.resnets.0", c, c)
    if attention:
        a = f"{prefix}.attentions.0"
        mods += [(f"{a}.group_norm", "norm", (c,))]
        mods += [(f"{a}.{n}", "linear", (c, c)) for n in ("to_q", "to_k", "to_v", "to_out.0")]
    return mods + _resnet(f"{prefix}.resnets.1", c, c)


def module_map(config: VAEConfig) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(diffusers prefix, Flax prefix, kind, diffusers weight shape) for every module with parameters."""
    ch, n, lc = config.block_out_channels, len(config.block_out_channels), config.latent_channels
    mods: list[tuple[str, str, tuple]] = [("encoder.conv_in", "conv", (ch[0], config.in_channels, 3, 3))]
    for i in range(n):
        cin = ch[max(i - 1, 0)]
        for j in range(config.layers_per_block):
            mods += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else ch[i], ch[i])
        if i < n - 1:
            mods.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", "conv", (ch[i], ch[i], 3, 3)))
    mods += _mid("encoder.mid_block", ch[-1], config.mid_block_add_attention)
    mods += [("encoder.conv_norm_out", "norm", (ch[-1],)),
             ("encoder.conv_out", "conv", (2 * lc, ch[-1], 3, 3))]
    rch = tuple(reversed(ch))
    mods.append(("decoder.conv_in", "conv", (rch[0], lc, 3, 3)))
    mods += _mid("decoder.mid_block", rch[0], config.mid_block_add_attention)
    for i in range(n):
        cin = rch[max(i - 1, 0)]
        for j in range(config.layers_per_block + 1):
            mods += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else rch[i], rch[i])
        if i < n - 1:
            mods.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", "conv", (rch[i], rch[i], 3, 3)))
    mods += [("decoder.conv_norm_out", "norm", (rch[-1],)),
             ("decoder.conv_out", "conv", (config.out_channels, rch[-1], 3, 3))]
    if config.use_quant_conv:
        mods.append(("quant_conv", "conv", (2 * lc, 2 * lc, 1, 1)))
    if config.use_post_quant_conv:
        mods.append(("post_quant_conv", "conv", (lc, lc, 1, 1)))
    return [(p, p, kind, shape) for p, kind, shape in mods]


def key_map(config: VAEConfig) -> list[Rule]:
    """The per-tensor rules (diffusers key <-> Flax key, transform, shape) for ``config``."""
    rules = []
    for dprefix, fprefix, kind, wshape in module_map(config):
        for dname, fname, tr in KINDS[kind]:
            shape = wshape if dname == "weight" else (wshape[0],)
            rules.append(Rule(f"{dprefix}.{dname}", f"{fprefix}.{fname}", tr, shape))
    return rules


# ----------------------------------------------------------------------------------------------
# tensors <-> files


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _weight_files(folder: pathlib.Path, single: str) -> list[pathlib.Path]:
    if (folder / single).exists():
        return [folder / single]
    index = folder / f"{single}.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, json.JSONDecodeError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from e
        return [folder / n for n in names]
    raise ConversionError(f"{folder}: no {single} (or {single}.index.json)")


def read_tensors(files: Iterable[pathlib.Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of the safetensors ``files`` as numpy (dtype as stored) and the file of each key."""
    from safetensors import safe_open

    tensors, where = {}, {}
    for f in files:
        if not f.exists():
            raise ConversionError(f"weights file {f} does not exist")
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = _to_numpy(fh.get_tensor(k))
                where[k] = str(f)
    return tensors, where


def write_tensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """Write numpy tensors (any dtype incl. ml_dtypes.bfloat16) to one safetensors file."""
    import torch
    from safetensors.torch import save_file

    def _t(a: np.ndarray):
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: _t(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def apply_rules(rules: list[Rule], tensors: dict[str, np.ndarray], where: dict[str, str], *,
                to_flax: bool, source: str) -> dict[str, np.ndarray]:
    """Rename + transform ``tensors`` by ``rules``; missing/unexpected/mis-shaped keys: ConversionError."""
    out = {}
    src_key = (lambda r: r.diffusers_key) if to_flax else (lambda r: r.flax_key)
    expected = {src_key(r) for r in rules}
    missing = [src_key(r) for r in rules if src_key(r) not in tensors]
    if missing:
        raise ConversionError(f"{source}: missing {len(missing)} tensor(s), first: {missing[0]!r}"
                              f"{'' if len(missing) == 1 else f' (all: {missing[:8]}...)'}")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ConversionError(f"{source}: unexpected tensor {extra[0]!r} in {where.get(extra[0], source)}"
                              f"{'' if len(extra) == 1 else f' (+{len(extra) - 1} more: {extra[1:6]})'}")
    for r in rules:
        k = src_key(r)
        a = tensors[k]
        want = r.diffusers_shape if to_flax else r.flax_shape
        if tuple(a.shape) != tuple(want):
            raise ConversionError(f"{where.get(k, source)}: tensor {k!r} has shape {tuple(a.shape)}, "
                                  f"expected {tuple(want)}")
        if to_flax:
            out[r.flax_key] = r.transform.forward(a)
        else:
            out[r.diffusers_key] = r.transform.inverse(a)
    return out


def is_flax_folder(folder: pathlib.Path) -> bool:
    """Whether ``folder/config.json`` marks a converted Flax VAE."""
    d = json.loads((folder / "config.json").read_text())
    return isinstance(d.get("awm_jax"), dict) and d["awm_jax"].get("format") == "flax"


def _read_config_dict(folder: pathlib.Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def read_flax_tensors(src: str | pathlib.Path) -> tuple[VAEConfig, dict[str, np.ndarray]]:
    """(config, Flax-keyed tensors) from a VAE/pipeline folder in either format, checked by the key map."""
    folder = resolve_vae_dir(src)
    config = read_vae_config(folder)
    rules = key_map(config)
    if is_flax_folder(folder):
        tensors, where = read_tensors(_weight_files(folder, FLAX_WEIGHTS))
        for r in rules:  # validate names and shapes against the map
            if r.flax_key in tensors and tuple(tensors[r.flax_key].shape) != r.flax_shape:
                raise ConversionError(f"{where[r.flax_key]}: tensor {r.flax_key!r} has shape "
                                      f"{tuple(tensors[r.flax_key].shape)}, expected {r.flax_shape}")
        identity = [Rule(r.flax_key, r.flax_key, Identity(), r.flax_shape) for r in rules]
        return config, apply_rules(identity, tensors, where, to_flax=True, source=str(folder))
    tensors, where = read_tensors(_weight_files(folder, DIFFUSERS_WEIGHTS))
    return config, apply_rules(rules, tensors, where, to_flax=True, source=str(folder))


def to_flax(src: str | pathlib.Path, dst: str | pathlib.Path) -> pathlib.Path:
    """Convert a diffusers VAE folder (or pipeline folder with ``vae/``) to the Flax folder format at dst."""
    folder = resolve_vae_dir(src)
    if is_flax_folder(folder):
        raise ConversionError(f"{folder}: already a converted Flax VAE (config.json has awm_jax.format=flax)")
    _, tensors = read_flax_tensors(folder)
    dst = pathlib.Path(dst)
    cfg = _read_config_dict(folder)
    cfg["awm_jax"] = {"format": "flax", "model": MODEL_NAME}
    dst.mkdir(parents=True, exist_ok=True)
    write_tensors(tensors, dst / FLAX_WEIGHTS)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dst


def to_diffusers(src: str | pathlib.Path, dst: str | pathlib.Path) -> pathlib.Path:
    """Convert a Flax VAE folder back to a diffusers ``AutoencoderKL`` folder (bit-exact inverse)."""
    folder = resolve_vae_dir(src)
    if not is_flax_folder(folder):
        raise ConversionError(f"{folder}: not a converted Flax VAE (config.json lacks awm_jax.format=flax)")
    config = read_vae_config(folder)
    tensors, where = read_tensors(_weight_files(folder, FLAX_WEIGHTS))
    out = apply_rules(key_map(config), tensors, where, to_flax=False, source=str(folder))
    cfg = _read_config_dict(folder)
    cfg.pop("awm_jax", None)
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_tensors(out, dst / DIFFUSERS_WEIGHTS)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dst


def model_from_flax_tensors(config: VAEConfig, tensors: dict[str, np.ndarray], *, dtype=None,
                            param_dtype=None) -> AutoencoderKL:
    """Build the NNX model from Flax-keyed tensors without materialising a random init."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(abstract_vae(config, dtype=dtype))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        key = ".".join(str(p) for p in path)
        if key not in tensors:
            raise ConversionError(f"model parameter {key!r} has no tensor")
        a = jnp.asarray(tensors[key])
        if tuple(a.shape) != tuple(var.get_value().shape):
            raise ConversionError(f"tensor {key!r} has shape {tuple(a.shape)}, model expects "
                                  f"{tuple(var.get_value().shape)}")
        if param_dtype is not None:
            a = a.astype(param_dtype)
        flat.append((path, var.replace(a)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(src: str | pathlib.Path, *, dtype=None, param_dtype=None) -> AutoencoderKL:
    """``AutoencoderKL`` from a diffusers VAE folder, pipeline folder, or converted Flax folder."""
    config, tensors = read_flax_tensors(src)
    return model_from_flax_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype)


def model_to_diffusers_tensors(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """The model's parameters as a diffusers ``AutoencoderKL`` state dict (numpy)."""
    from flax import nnx

    tensors = {".".join(str(p) for p in path): np.asarray(v.get_value())
               for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return apply_rules(key_map(model.config), tensors, {}, to_flax=False, source="model")
