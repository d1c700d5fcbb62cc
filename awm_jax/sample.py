"""Sample images from an SD3 / SD3.5 pipeline folder with the Flax models (Euler ODE).

    python -m awm_jax.sample --model DIR --prompt "a red cat" --steps 40 --out image.png \
        [--prompt ...] [--num-images-per-prompt N] [--batch-size B] [--seed S] [--guidance-scale G] \
        [--height H --width W] [--dtype bfloat16] [--max-sequence-length 128] [--no-t5]

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
    p.add_argument("--model", required=True, help="diffusers SD3 / SD3.5 pipeline folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--out", required=True, help="output image path (.png / .jpg)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    p.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens")
    p.add_argument("--no-t5", action="store_true", help="skip T5 (zero block, like diffusers without it)")
    args = p.parse_args(argv)
    for name in ("steps", "num_images_per_prompt", "batch_size", "max_sequence_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (pathlib.Path(args.model) / "model_index.json").exists():
        p.error(f"--model {args.model}: not a diffusers pipeline folder (no model_index.json)")
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

    from awm_jax.pipelines import load_sd3

    pipe = load_sd3(args.model, height=args.height, width=args.width,
                    dtype=None if args.dtype == "float32" else jnp.dtype(args.dtype),
                    max_sequence_length=args.max_sequence_length, load_t5=not args.no_t5)
    prompts = [p for p in args.prompt for _ in range(args.num_images_per_prompt)]
    key = jax.random.key(args.seed)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), pipe.latent_shape))
                      for i in range(len(prompts))])
    paths = output_paths(args.out, len(prompts))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(prompts), args.batch_size):
        chunk = prompts[s:s + args.batch_size]
        lat = pipe.sample_latents(chunk, num_steps=args.steps, guidance_scale=args.guidance_scale,
                                  latents=noise[s:s + len(chunk)], negative_prompt=args.negative_prompt)
        for i, img in enumerate(np.asarray(pipe.decode(lat))):
            Image.fromarray(img).save(paths[s + i])
            print(f"{paths[s + i]}\t{chunk[i]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
