"""Strict per-tag GenEval accuracy of a toy pipeline, sampled with a deterministic Euler ODE.

    python -m awm_jax.toy.evaluate --ckpt awm_jax/toy/assets/toy_mmdit [--split heldout@48 --per-prompt 1]

The sampler is a local 40-step Euler ODE ``x <- x + (t_next - t) v(x, t)`` from t = 1 (noise) to 0
on the (optionally shifted) grid ``t' = s t / (1 + (s - 1) t)``; no CFG (as in AWM).
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.toy.reward import ToyGenEvalScorer, per_tag_accuracy
from awm_jax.toy.shapes import parse_split_spec, render_meta


def time_grid(steps: int, shift: float = 3.0, t_start: float = 1.0) -> np.ndarray:
    """(steps + 1,) decreasing times: ``linspace(t_start, 0)`` shifted like SD3's scheduler."""
    t = np.linspace(t_start, 0.0, steps + 1)
    return (shift * t / (1.0 + (shift - 1.0) * t)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def make_euler_sampler(graphdef, steps: int = 40, shift: float = 3.0, t_start: float = 1.0):
    """Jitted ``sample(state, x_t, embeds, pooled) -> x0``: Euler ODE over ``time_grid`` (cached)."""
    grid = jnp.asarray(time_grid(steps, shift, t_start))

    @jax.jit
    def sample(state, x, embeds, pooled):
        model = nnx.merge(graphdef, state)

        def body(x, i):
            t, t_next = grid[i], grid[i + 1]
            tb = jnp.full((x.shape[0],), t)
            v = model(
                hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=1000.0 * tb
            )
            return x + (t_next - t) * v, None

        x, _ = jax.lax.scan(body, x, jnp.arange(steps))
        return x

    return sample


def generate(
    pipeline, prompts: list[str], seed: int = 0, steps: int = 40, shift: float = 3.0, batch: int = 64
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for ``prompts``, sampled in chunks of ``batch`` (the last one padded).

    The initial noise of chunk k comes from the k-th split of ``jax.random.key(seed)``.
    """
    graphdef, state = nnx.split(pipeline.transformer)
    sample = make_euler_sampler(graphdef, steps, shift)
    key = jax.random.key(seed)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        pad = batch - len(chunk)
        emb, pooled = pipeline.text_encoder.encode(chunk + chunk[:1] * pad)
        key, sub = jax.random.split(key)
        x1 = jax.random.normal(sub, (len(emb), *pipeline.latent_shape), jnp.float32)
        x0 = sample(state, x1, jnp.asarray(emb), jnp.asarray(pooled))
        out.append(np.asarray(pipeline.decode(x0))[: len(chunk)])
    return np.concatenate(out)


def evaluate_pipeline(
    pipeline,
    split: str = "heldout",
    per_prompt: int = 4,
    seed: int = 0,
    steps: int = 40,
    shift: float = 3.0,
    batch: int = 64,
    return_images: bool = False,
) -> dict:
    """Strict per-tag accuracy (and mean partial score) of ``pipeline`` on a prompt split.

    ``split``: ``"train" | "heldout" | "all"``, optionally tag-balanced as ``"heldout@32"`` (32 prompts
    per tag, each tag's prompts repeated cyclically; :func:`awm_jax.toy.shapes.parse_split_spec`).
    """
    metas = [m for m in parse_split_spec(split) for _ in range(per_prompt)]
    prompts = [m["prompt"] for m in metas]
    images = generate(pipeline, prompts, seed, steps, shift, batch)
    ev = ToyGenEvalScorer().evaluate(images, prompts, metas)
    out = {
        "accuracy": per_tag_accuracy(ev),
        "partial_score": float(ev["score"].mean()),
        "n_images": len(metas),
    }
    if return_images:
        out["images"], out["prompts"], out["correct"] = images, prompts, ev["accuracy"]
    return out


def renoise_accuracy(
    pipeline, t_start: float, split: str = "heldout@8", steps: int = 40, seed: int = 0
) -> float:
    """Strict accuracy (per image) of rendered scenes noised to ``t_start`` and denoised by the model.

    Real images of ``split`` are mixed with noise as ``(1 - t) x0 + t eps`` and integrated back to 0 on a
    uniform ``steps``-step Euler grid: where the accuracy falls is where the model decides the layout.
    """
    metas = parse_split_spec(split)
    prompts = [m["prompt"] for m in metas]
    x0 = pipeline.encode_images(np.stack([render_meta(m, i)[0] for i, m in enumerate(metas)]))
    x = (1.0 - t_start) * x0 + t_start * jax.random.normal(jax.random.key(seed), x0.shape, x0.dtype)
    emb, pooled = pipeline.text_encoder.encode(prompts)
    graphdef, state = nnx.split(pipeline.transformer)
    sample = make_euler_sampler(graphdef, steps, 1.0, float(t_start))
    images = np.asarray(pipeline.decode(sample(state, x, jnp.asarray(emb), jnp.asarray(pooled))))
    return float(ToyGenEvalScorer().evaluate(images, prompts, metas)["accuracy"].mean())


def main(argv=None) -> dict:
    """CLI entry point; prints and returns the evaluation dict."""
    from awm_jax.toy.world import load_toy_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--split", default="heldout@48", help="train | heldout | all, optionally @<per-tag count>")
    p.add_argument("--per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default="", help="also write a PNG grid of the images (verdict in the caption)")
    p.add_argument("--grid-images", type=int, default=48)
    p.add_argument(
        "--renoise",
        type=float,
        nargs="*",
        default=[],
        help="also: accuracy of real scenes of --split noised to each of these t and denoised again",
    )
    a = p.parse_args(argv)
    pipe = load_toy_pipeline(a.ckpt)
    if a.renoise:
        renoise = {str(t): renoise_accuracy(pipe, t, a.split, a.steps, a.seed) for t in a.renoise}
    res = evaluate_pipeline(pipe, a.split, a.per_prompt, a.seed, a.steps, a.shift, return_images=bool(a.grid))
    if a.grid:
        from awm_jax.logging_lib import save_image_grid

        n = a.grid_images
        caps = [("OK " if c else "x ") + p for p, c in zip(res["prompts"][:n], res["correct"][:n])]
        save_image_grid(a.grid, res["images"][:n], caps)
        for k in ("images", "prompts", "correct"):
            res.pop(k)
    if a.renoise:
        res["renoise_accuracy"] = renoise
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
