"""Sample images from an SD3 / SD3.5, FLUX.1, Z-Image or Qwen-Image pipeline folder, a trained run or a LoRA
(Euler ODE).

    python -m awm_jax.sample --model DIR --prompt "a red cat" --steps 40 --out image.png \
        [--prompt ...] [--num-images-per-prompt N] [--batch-size B] [--seed S] [--guidance-scale G] \
        [--height H --width W] [--dtype bfloat16] [--max-sequence-length 128] [--no-t5] [--guidance 3.5]
    python -m awm_jax.sample --run WORKDIR [--which trainable|eval_ema|kl_ema] [--step N] [--model DIR] ...
    python -m awm_jax.sample --model DIR --lora EXPORT_DIR ...

``--model`` is a diffusers pipeline folder (``model_index.json``); its ``transformer/`` and / or ``vae/``
may be awm-jax Flax folders (``tools/convert_weights.py to-flax --dst DIR/transformer``). The model family is
recognised from ``DIR/transformer/config.json``; its defaults and the flags it refuses are the family's
(``ModelFamily.sample_pipeline`` / ``sample_flag_problems``). SD3 defaults: 40 steps, 128 T5 tokens; FLUX
defaults: 28 steps, 512 T5 tokens, 1024x1024 images, distilled ``--guidance`` 3.5 fed to FLUX.1-dev (schnell
ignores it); FLUX has no classifier-free guidance (``--guidance-scale``, ``--negative-prompt``, ``--no-t5``:
SD3 only). Z-Image: 50 steps, CFG ``--guidance-scale`` 5 (ZImagePipeline's g); Qwen-Image: 50 steps, true CFG
4 applied only with a ``--negative-prompt``; both 512 text tokens.

``--run WORKDIR`` samples a trainer workdir (``python -m awm_jax.train --workdir WORKDIR``): the pipeline is
loaded as the run's ``config.json`` says (``model.*``: path, dtypes, resolution, T5 tokens, scanned layers;
``--model`` replaces ``model.path``, ``--dtype`` / ``--height`` / ``--max-sequence-length`` / ``--no-t5`` the
matching keys), the adapter item ``--which`` (``trainable``: the trained weights, the default; ``eval_ema``;
``kl_ema``) of checkpoint ``--step`` (default: the newest) is restored by name and merged with the base
weights (``nnx.merge`` of the LoRA state with the base state; a ``lora.full_finetune`` run's item replaces
every parameter). Steps, CFG scale and FLUX guidance default to the run's ``eval.num_steps``,
``eval.guidance_scale`` and ``model.guidance``.

``--lora DIR`` folds a LoRA folder exported by awm-jax into ``--model``'s transformer (``W + A B alpha / r``):
a diffusers/peft folder (``tools/convert_weights.py export-lora``: ``pytorch_lora_weights.safetensors`` with
the adapter config in its header) or a Flax LoRA folder (``lora_config.json`` + ``lora.safetensors``).

One image is written as ``--out``; several as ``<stem>_<i><suffix>`` in prompt-major order. Image ``i``
uses the initial noise ``N(0, I)`` of ``jax.random.fold_in(key(seed), i)``, so results do not depend on
``--batch-size``. ``--guidance-scale`` > 1 enables classifier-free guidance with an empty negative
prompt (AWM samples without CFG; SD3.5's usual value is 4.5). Bad input prints one ``error:`` line naming the
flag, folder, step or item, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
WHICH = {"trainable": "trainable", "policy": "trainable", "eval_ema": "eval_ema", "kl_ema": "kl_ema"}


class SampleError(ValueError):
    """Bad sampling input (a run, step, item or LoRA folder); the message names it."""


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m awm_jax.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="diffusers SD3 / SD3.5, FLUX.1, Z-Image or Qwen-Image pipeline folder (with --run: "
                        "replaces model.path)")
    p.add_argument("--run", default=None, metavar="WORKDIR",
                   help="trainer workdir (config.json + checkpoints/)")
    p.add_argument("--which", default=None, choices=sorted(WHICH),
                   help="--run: the adapter item to sample (default trainable; policy = trainable)")
    p.add_argument("--step", type=int, default=None, help="--run: checkpoint step (default: the newest)")
    p.add_argument("--lora", default=None, metavar="EXPORT_DIR",
                   help="LoRA folder exported by awm-jax (peft or Flax), folded into --model")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--out", required=True, help="output image path (.png / .jpg)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: SD3 40, FLUX 28)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (SD3 only; default 1)")
    p.add_argument("--guidance", type=float, default=None,
                   help="FLUX.1-dev distilled guidance (model input; default 3.5)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default float32)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default: SD3 128, FLUX 512)")
    p.add_argument("--no-t5", action="store_true", help="skip T5 (zero block, like diffusers without it)")
    p.add_argument("--compile-cache", default="",
                   help="JAX compilation cache dir ('' = per-user ~/.cache/awm_jax/jax_cache, 'off' = none)")
    args = p.parse_args(argv)
    for name in ("steps", "num_images_per_prompt", "batch_size", "max_sequence_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.run_config = None
    if args.run is None:
        if args.model is None:
            p.error("give --model DIR (a pipeline folder) or --run WORKDIR (a trained run)")
        for flag, val in (("--which", args.which), ("--step", args.step)):
            if val is not None:
                p.error(f"{flag} picks a checkpoint of a trained run: it needs --run WORKDIR")
    else:
        if args.lora:
            p.error("--lora folds an exported LoRA into --model; --run already restores the run's adapter")
        try:
            args.run_config = run_config(args.run, args.model, args.step)
        except SampleError as e:
            p.error(str(e))
    model = args.model if args.run is None else args.run_config.model.path
    problem = pipeline_folder_problem(model, "--model" if args.model else f"--run {args.run}: model.path")
    if problem:
        p.error(problem + ("; give --model DIR (the pipeline folder)" if args.run and not args.model else ""))
    from awm_jax.models import detect_family

    try:
        args.family = detect_family(model).name
    except (OSError, ValueError) as e:
        p.error(f"--model {model}: cannot recognise the model family: {e}")
    if args.run is not None and args.family != str(args.run_config.model.kind):
        p.error(f"--run {args.run}: config.json model.kind = {args.run_config.model.kind!r} but the model "
                f"folder {model} holds a {args.family!r} transformer")
    from awm_jax.models.family import get_family

    family = get_family(args.family)
    if not family.sample_loader:
        p.error(f"--model {model}: model family {args.family!r} has no sampling pipeline here")
    for problem in family.sample_flag_problems(args):
        p.error(problem)
    return args


def pipeline_folder_problem(path: str, flag: str) -> str:
    """Why ``path`` is not a pipeline folder the samplers load ("" when it is one)."""
    d = pathlib.Path(path)
    if (d / "model_index.json").is_file():
        return ""
    if not d.exists():
        return f"{flag} {path}: no such folder"
    try:
        info = json.loads((d / "config.json").read_text()).get("awm_jax")
    except (OSError, ValueError, AttributeError):
        info = None
    if isinstance(info, dict) and info.get("format") == "flax":
        return (f"{flag} {path}: is an awm-jax Flax {info.get('model')!r} folder alone "
                "(tools/convert_weights.py to-flax); sampling needs the whole pipeline (tokenizers, text "
                "encoders, VAE): put it in a copy of the diffusers pipeline folder as transformer/ (or vae/) "
                "and give that folder")
    if (d.parent / "model_index.json").is_file():
        return f"{flag} {path}: give the pipeline folder {d.parent} (this is one of its parts)"
    return f"{flag} {path}: not a diffusers pipeline folder (no model_index.json)"


# ------------------------------------------------------------------------------------------- trained runs


def run_config(workdir: str, model: str | None = None, step: int | None = None):
    """The run's config as a ConfigDict: the ``config`` item of checkpoint ``step`` (default: the newest;
    ``config.json`` when the checkpoint keeps none); ``model`` replaces ``model.path`` (and the VAE /
    text-encoder paths that pointed inside the old pipeline folder)."""
    import ml_collections

    from awm_jax.checkpoint import CheckpointFormatError
    from awm_jax.resume_check import saved_config

    d = pathlib.Path(workdir)
    path = d / "config.json"
    if not path.is_file() or not (d / "checkpoints").is_dir():
        raise SampleError(f"--run {workdir}: not a trainer workdir (needs config.json and checkpoints/)")
    try:
        saved = saved_config(str(d), step)
        cfg = ml_collections.ConfigDict(saved if saved is not None else json.loads(path.read_text()))
    except ValueError as e:
        raise SampleError(f"--run {workdir}: cannot read {path} ({e})") from None
    except CheckpointFormatError as e:
        raise SampleError(f"--run {workdir}: {e}") from None
    for key in ("model", "lora"):
        if key not in cfg:
            raise SampleError(f"--run {workdir}: {path} has no {key!r} section")
    if model is not None:
        old = str(cfg.model.get("path") or "")
        old_root = pathlib.Path(old)
        if not (old_root / "model_index.json").exists():
            old_root = old_root.parent

        def inside(p: str) -> bool:
            return bool(old) and bool(p) and pathlib.Path(p).resolve().is_relative_to(old_root.resolve())

        cfg.model.path = str(model)
        if inside(str(cfg.model.get("vae_path", ""))):
            cfg.model.vae_path = ""
        paths = [str(p) for p in (cfg.model.get("text_encoder_paths") or ())]
        cfg.model.text_encoder_paths = ["" if inside(p) else p for p in paths]
    elif not cfg.model.get("path"):
        raise SampleError(f"--run {workdir}: config.json model.path is empty; give --model DIR")
    return cfg


def _apply_overrides(cfg, args) -> None:
    """The CLI's model flags onto the run's ``config.model`` (what the trainer's pipeline loader reads)."""
    m = cfg.model
    if args.dtype:
        m.dtype = args.dtype
    if args.height or args.width:
        h, w = args.height or args.width, args.width or args.height
        if h != w:
            raise SampleError(f"--run: the run's pipeline takes one square model.resolution; got "
                              f"--height {h} --width {w}")
        m.resolution = int(h)
    if args.max_sequence_length:
        m.max_sequence_length = int(args.max_sequence_length)
    if args.no_t5:
        paths = list(m.get("text_encoder_paths") or [])
        m.text_encoder_paths = (paths + ["", "", ""])[:2] + ["none"] + paths[3:]


def restore_adapter(workdir: str, which: str = "trainable", step: int | None = None,
                    templates: dict[str, Any] | None = None) -> tuple[int, Any]:
    """``(step, item)``: the adapter item ``which`` of checkpoint ``step`` (default newest) of ``workdir``,
    restored onto ``templates[which]`` (None: as raw nested dicts)."""
    from awm_jax.checkpoint import CheckpointFormatError, CheckpointLookupError, restore_item

    item = WHICH.get(which)
    if item is None:
        raise SampleError(f"--which {which!r}: expected one of {sorted(WHICH)}")
    tmpl = templates.get(which) if templates else None
    try:
        return restore_item(str(pathlib.Path(workdir) / "checkpoints"), item, step, tmpl)
    except CheckpointFormatError as e:
        raise SampleError(f"--run {workdir}: {e}") from None
    except CheckpointLookupError as e:
        hint = (f" (--which {which}; eval_ema needs ema.eval_ema, kl_ema an off-policy run)"
                if "keeps no" in str(e) else "")
        raise SampleError(f"--run {workdir}: {e}{hint}") from None


def load_run(args) -> tuple[Any, Any, int]:
    """``(pipeline, config, step)``: the run's pipeline with the restored adapter applied."""
    from flax import nnx

    from awm_jax.models.family import get_family
    from awm_jax.rl import train_step as ts

    cfg = args.run_config
    _apply_overrides(cfg, args)
    which = args.which or "trainable"
    pipe = get_family(str(cfg.model.kind)).load_pipeline(cfg)
    if bool(cfg.lora.full_finetune):
        template = nnx.state(pipe.transformer, nnx.Param)
        step, params = restore_adapter(args.run, which, args.step, {which: template})
        nnx.update(pipe.transformer, params)
    else:
        graphdef, base_state, state = ts.create_train_state(pipe.transformer, cfg)
        step, lora = restore_adapter(args.run, which, args.step, {which: state.trainable})
        pipe.transformer = nnx.merge(graphdef, lora, base_state)
    return pipe, cfg, step


# ------------------------------------------------------------------------------------------- LoRA folders


def read_lora_folder(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An exported LoRA folder -> ``(Flax params {module.lora_a|b}, info with rank / alpha)``
    (``awm_jax.convert.lora_export.read_lora_folder``), errors as :class:`SampleError` naming ``--lora``."""
    from awm_jax.convert import ConversionError
    from awm_jax.convert.lora_export import read_lora_folder as read

    try:
        return read(path)
    except ConversionError as e:
        raise SampleError(f"--lora {e}") from None


def apply_lora(transformer, path: str) -> None:
    """Fold the LoRA folder ``path`` into ``transformer``'s kernels in place (``W += A B alpha / r``)."""
    import numpy as np
    from flax import nnx

    from awm_jax.convert import ConversionError
    from awm_jax.convert.lora_export import merge_lora, split_lora_params
    from awm_jax.models.family import family_of

    if getattr(transformer, "scan_layers", False):
        raise SampleError("--lora: the transformer is loaded with scanned layers; load it per layer")
    params, info = read_lora_folder(path)
    model = info.get("model")
    conv = family_of(transformer).converter
    if model and model != conv:
        raise SampleError(f"--lora {path}: a LoRA of a {model!r} transformer, --model holds a {conv!r} one")
    flat = {".".join(str(getattr(k, "key", k)) for k in p): v
            for p, v in nnx.to_flat_state(nnx.state(transformer, nnx.Param))}
    try:
        mods = split_lora_params(params)
        kernels = {}
        for mod in mods:
            key = f"{mod}.kernel"
            if key not in flat:
                raise SampleError(f"--lora {path}: module {mod!r} has no kernel {key!r} in the --model "
                                  "transformer (a LoRA of another model?)")
            kernels[key] = np.asarray(flat[key][...])
        merged = merge_lora(kernels, params, int(info["rank"]), float(info["alpha"]))
    except ConversionError as e:
        raise SampleError(f"--lora {path}: {e}") from None
    for key, value in merged.items():
        flat[key][...] = value


# ------------------------------------------------------------------------------------------- the CLI


def output_paths(out: str | pathlib.Path, n: int) -> list[pathlib.Path]:
    """``out`` for one image, else ``<stem>_<i><suffix>`` for each of ``n``."""
    out = pathlib.Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def load_pipeline(args) -> tuple[Any, dict]:
    """``(pipeline, sample_latents options)`` per the parsed ``args`` (a run, a model, a model + LoRA); the
    family's sampling hooks (``ModelFamily.sample_pipeline`` / ``run_sample_options``) hold its defaults."""
    import jax.numpy as jnp

    from awm_jax.models.family import get_family

    family = get_family(args.family)
    if args.run is not None:
        pipe, cfg, step = load_run(args)
        steps = args.steps or int(cfg.eval.num_steps)
        return pipe, dict(num_steps=steps, **family.run_sample_options(cfg, args))
    dtype = None if args.dtype in (None, "float32") else jnp.dtype(args.dtype)
    pipe, options = family.sample_pipeline(args, dtype)
    if args.lora:
        apply_lora(pipe.transformer, args.lora)
    return pipe, options


def initial_noise(pipe, n: int, seed: int):
    """``(n, *latent_shape)`` noise: image ``i`` from ``fold_in(key(seed), i)``."""
    import jax
    import numpy as np

    key = jax.random.key(seed)
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), pipe.latent_shape))
                     for i in range(n)])


def main(argv=None) -> int:
    """Run the CLI; returns 0, or 2 after one ``error:`` line (argument errors exit with status 2)."""
    args = parse_args(argv)
    import numpy as np
    from PIL import Image

    from awm_jax import compile_cache
    from awm_jax.convert import ConversionError

    compile_cache.enable(args.compile_cache)
    try:
        pipe, options = load_pipeline(args)
    except (SampleError, ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = [p for p in args.prompt for _ in range(args.num_images_per_prompt)]
    noise = initial_noise(pipe, len(prompts), args.seed)
    paths = output_paths(args.out, len(prompts))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(prompts), args.batch_size):
        chunk = prompts[s:s + args.batch_size]
        lat = pipe.sample_latents(chunk, latents=noise[s:s + len(chunk)], **options)
        for i, img in enumerate(np.asarray(pipe.decode(lat))):
            Image.fromarray(img).save(paths[s + i])
            print(f"{paths[s + i]}\t{chunk[i]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
