"""Rollout selection on the toy world: do cheap previews rank seeds like the full rollouts? And DPM2 vs Euler.

For ``--prompts`` training prompts x ``--seeds`` seeds of the pretrained toy model (``configs/toy.py``), every
seed is sampled twice from the same initial noise (``awm_jax.rl.selection.seed_noise``): a preview
(``--preview-sampler``, ``--preview-steps``; ``select.preview_dtype``) and the toy's full rollout (its
``sample.*``), and both are scored with the toy reward. Reported: the Spearman rank correlation of preview and
full rewards (over all samples, and the mean over prompts; Sol-RL reports 0.927 for its FP4 6-step previews
of SANA), how many of the full rollouts' top-k / bottom-k seeds per prompt the previews' top-k / bottom-k
contain, the full rewards of the kept seeds against all seeds (the contrast selection buys), and the wall
time of previews vs full rollouts. ``--sampler-accuracy`` adds the mean |x0 - x0_ref| of 10- and 20-step DPM2
and Euler rollouts against a 100-step Euler reference on the same noise (6, 10, 20 steps)::

    python benchmarks/selection_preview.py --prompts 8 --seeds 32 --keep 4 --preview-steps 6 \\
        --sampler-accuracy
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402


def _spearman(a, b) -> float:
    from awm_jax.rl.selection import rank_correlation

    return rank_correlation(a, b)


def run(prompts: int = 8, seeds: int = 32, keep: int = 4, preview_steps: int = 6,
        preview_sampler: str = "dpm2", preview_dtype: str = "float32", sampler_accuracy: bool = False,
        config: str = "configs/toy.py", seed: int = 0) -> dict:
    """The measurement (module docstring); returns the result record."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from awm_jax import config_lib, rewards
    from awm_jax.data import load_dataset
    from awm_jax.models.family import get_family
    from awm_jax.rl import selection
    from awm_jax.rl import train_step as ts
    from awm_jax.rl.rollout import make_preview_rollout_fn

    c = config_lib.load_config(os.path.join(U.ROOT, config))
    c.select.enabled = True
    c.select.num_seeds, c.select.top_k, c.select.bottom_k = seeds, keep, keep
    c.data.group_size = 2 * keep
    c.select.preview_steps, c.select.preview_sampler = preview_steps, preview_sampler
    c.select.preview_dtype = preview_dtype
    config_lib.validate(c)
    pipe = get_family(c.model.kind).load_pipeline(c)
    graphdef, base, state = ts.create_train_state(pipe.transformer, c)
    shape = tuple(pipe.latent_shape)
    scorer = rewards.from_config(c)
    data = load_dataset(c.data.train_prompts, c.data.train_format)
    idx = np.linspace(0, len(data) - 1, prompts).astype(int)  # spread over the tag-balanced split
    texts, meta = data.take(np.repeat(idx, seeds))
    emb, pooled = (jnp.asarray(a) for a in pipe.text_encoder.encode(texts))
    x = selection.seed_noise(jax.random.key(seed), np.arange(len(texts)), shape)
    key = jax.random.key(seed + 1)
    params = state.trainable

    def rollout_of(sampler: str, steps: int):
        v = ml_collections.ConfigDict(c.to_dict())
        v.sample.sampler, v.sample.num_steps, v.sample.noise_level = sampler, steps, 0.0
        return ts.make_rollout_fn(graphdef, v, None, latent_shape=shape)

    def timed(fn):
        fn(params, base, emb, pooled, key, x_init=x)  # compile
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(params, base, emb, pooled, key, x_init=x)["x0"])
        return out, time.perf_counter() - t0

    x_prev, t_prev = timed(make_preview_rollout_fn(graphdef, c, None, latent_shape=shape))
    x_full, t_full = timed(ts.make_rollout_fn(graphdef, c, None, latent_shape=shape))

    def score(x0):
        return np.asarray(scorer(np.asarray(pipe.decode(x0)), texts, meta), np.float64)

    r_prev, r_full = score(x_prev).reshape(prompts, seeds), score(x_full).reshape(prompts, seeds)
    per_prompt = [_spearman(a, b) for a, b in zip(r_prev, r_full)]
    cols_prev = selection.select_extremes(r_prev, keep, keep)
    cols_full = selection.select_extremes(r_full, keep, keep)
    top_hit = np.mean([len(set(p[:keep]) & set(f[:keep])) / keep for p, f in zip(cols_prev, cols_full)])
    bot_hit = np.mean([len(set(p[keep:]) & set(f[keep:])) / keep for p, f in zip(cols_prev, cols_full)])
    kept = np.take_along_axis(r_full, cols_prev, axis=1)
    rec = {
        "bench": "selection_preview", "config": config, "prompts": prompts, "seeds": seeds, "keep": keep,
        "preview": f"{preview_sampler} x {preview_steps} ({preview_dtype})",
        "full": f"{c.sample.sampler} x {c.sample.num_steps}",
        "spearman_all": _spearman(r_prev.ravel(), r_full.ravel()),
        "spearman_per_prompt_mean": float(np.nanmean(per_prompt)),
        "top_k_overlap": float(top_hit), "bottom_k_overlap": float(bot_hit),
        "full_reward_all": float(r_full.mean()), "full_reward_kept_top": float(kept[:, :keep].mean()),
        "full_reward_kept_bottom": float(kept[:, keep:].mean()),
        "full_reward_std_all": float(r_full.std(axis=1).mean()),
        "full_reward_std_kept": float(kept.std(axis=1).mean()),
        "preview_s": t_prev, "full_s": t_full,
    }
    if sampler_accuracy:
        ref = rollout_of("ode", 100)(params, base, emb, pooled, key, x_init=x)["x0"]
        for name in ("dpm2", "ode"):
            for n in (6, 10, 20):
                out = rollout_of(name, n)(params, base, emb, pooled, key, x_init=x)["x0"]
                rec[f"x0_err_{name}_{n}"] = float(jnp.mean(jnp.abs(out - ref)))
    return rec


def main(argv=None) -> dict:
    """CLI: run, print the record, append it to ``--out`` (JSONL) if given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--keep", type=int, default=4, help="top-k = bottom-k")
    ap.add_argument("--preview-steps", type=int, default=6)
    ap.add_argument("--preview-sampler", default="dpm2", choices=["dpm2", "ode"])
    ap.add_argument("--preview-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--sampler-accuracy", action="store_true")
    ap.add_argument("--config", default="configs/toy.py")
    ap.add_argument("--out", default=None, help="append the record to this JSONL file")
    a = ap.parse_args(argv)
    rec = run(a.prompts, a.seeds, a.keep, a.preview_steps, a.preview_sampler, a.preview_dtype,
              a.sampler_accuracy, a.config)
    rec["machine"] = U.machine_info("cpu")
    for k, v in rec.items():
        if k != "machine":
            print(f"{k}: {v}")
    U.append_jsonl(a.out, rec)
    return rec


if __name__ == "__main__":
    main()
