"""Sample images from an SD3 / SD3.5 or FLUX.1 pipeline folder with the Flax models (Euler ODE).

    python -m awm_jax.sample --model DIR --prompt "a red cat" --steps 40 --out image.png \
        [--prompt ...] [--num-images-per-prompt N] [--batch-size B] [--seed S] [--guidance-scale G] \
        [--height H --width W] [--dtype bfloat16] [--max-sequence-length 128] [--no-t5] [--guidance 3.5]

The model family is recognised from ``DIR/transformer/config.json``. SD3 defaults: 40 steps, 128 T5 tokens;
FLUX defaults: 28 steps, 512 T5 tokens, 1024x1024 images, distilled ``--guidance`` 3.5 fed to FLUX.1-dev
(schnell ignores it); FLUX has no classifier-free guidance (``--guidance-scale``, ``--negative-prompt``,
``--no-t5`` are SD3 options).

One image is written as ``--out``; several as ``<stem>_<i><suffix>`` in prompt-major order. Image ``i``
uses the initial noise ``N(0, I)`` of ``jax.random.fold_in(key(seed), i)``, so results do not depend on
``--batch-size``. ``--guidance-scale`` > 1 enables classifier-free guidance with an empty negative
prompt (AWM samples without CFG; SD3.5's usual value is 4.5).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m awm_jax.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers SD3 / SD3.5 or FLUX.1 pipeline folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--out", required=True, help="output image path (.png / .jpg)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: SD3 40, FLUX 28)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (SD3 only)")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev distilled guidance (model input)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default: SD3 128, FLUX 512)")
    p.add_argument("--no-t5", action="store_true", help="skip T5 (zero block, like diffusers without it)")
    p.add_argument("--compile-cache", default="",
                   help="JAX compilation cache dir ('' = per-user ~/.cache/awm_jax/jax_cache, 'off' = none)")
    args = p.parse_args(argv)
    for name in ("steps", "num_images_per_prompt", "batch_size", "max_sequence_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (pathlib.Path(args.model) / "model_index.json").exists():
        p.error(f"--model {args.model}: not a diffusers pipeline folder (no model_index.json)")
    from awm_jax.models import detect_family

    try:
        args.family = detect_family(args.model).name
    except (OSError, ValueError) as e:
        p.error(f"--model {args.model}: cannot recognise the model family: {e}")
    if args.family == "flux":
        sd3_only = (("--guidance-scale", args.guidance_scale != 1.0),
                    ("--negative-prompt", args.negative_prompt), ("--no-t5", args.no_t5))
        for flag, bad in sd3_only:
            if bad:
                p.error(f"{flag} is an SD3 option: FLUX samples without classifier-free guidance "
                        "(FLUX.1-dev takes --guidance)")
    elif args.family != "sd35":
        p.error(f"--model {args.model}: model family {args.family!r} has no sampling pipeline here")
    return args


def output_paths(out: str | pathlib.Path, n: int) -> list[pathlib.Path]:
    """``out`` for one image, else ``<stem>_<i><suffix>`` for each of ``n``."""
    out = pathlib.Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def main(argv=None) -> int:
    """Run the CLI; returns 0 (argument errors exit with status 2)."""
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from awm_jax import compile_cache
    from awm_jax.pipelines import load_flux, load_sd3

    compile_cache.enable(args.compile_cache)

    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    if args.family == "flux":
        pipe = load_flux(args.model, height=args.height, width=args.width, dtype=dtype,
                         max_sequence_length=args.max_sequence_length or 512)
        options = dict(num_steps=args.steps or 28, guidance=args.guidance)
    else:
        pipe = load_sd3(args.model, height=args.height, width=args.width, dtype=dtype,
                        max_sequence_length=args.max_sequence_length or 128, load_t5=not args.no_t5)
        options = dict(num_steps=args.steps or 40, guidance_scale=args.guidance_scale,
                       negative_prompt=args.negative_prompt)
    prompts = [p for p in args.prompt for _ in range(args.num_images_per_prompt)]
    key = jax.random.key(args.seed)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), pipe.latent_shape))
                      for i in range(len(prompts))])
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
