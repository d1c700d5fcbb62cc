"""Pretrain the toy SD3.5-architecture MMDiT + toy text encoder on the shapes world.

    python -m awm_jax.toy.pretrain --out awm_jax/toy/assets/toy_mmdit --steps 1500

Flow matching (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, logit-normal ``t``) on images
rendered on the fly from the *train* prompt split, AdamW with linear warm-up then a constant LR, an EMA of
the weights (the EMA is what is saved). At the end the EMA model is evaluated on the held-out split
with a 40-step Euler ODE (``awm_jax.toy.evaluate``) and the result is written to ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from awm_jax.toy.shapes import prompt_split, sample_batch
from awm_jax.toy.text import ToyTextEncoder, tokenize
from awm_jax.toy.world import ToyPipeline, build_models, default_config, encode_images, save_toy_checkpoint


class ToyModels(nnx.Module):
    """Container so transformer and text model are optimised as one parameter tree."""

    def __init__(self, transformer, text_model):
        self.transformer = transformer
        self.text_model = text_model


def flow_matching_loss(models: ToyModels, ids, x0, key):
    """Mean squared velocity error with logit-normal t."""
    k_t, k_eps = jax.random.split(key)
    b = x0.shape[0]
    t = jax.nn.sigmoid(jax.random.normal(k_t, (b,)))
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    tt = t[:, None, None, None]
    xt = (1.0 - tt) * x0 + tt * eps
    emb, pooled = models.text_model(ids)
    v = models.transformer(
        hidden_states=xt, encoder_hidden_states=emb, pooled_projections=pooled, timestep=1000.0 * t
    )
    return jnp.mean((v.astype(jnp.float32) - (eps - x0)) ** 2)


def make_train_step(graphdef, rest, tx, ema_decay: float):
    """Jitted ``step(params, ema, opt_state, ids, x0, key) -> (params, ema, opt_state, loss)``."""

    @jax.jit
    def step(params, ema, opt_state, ids, x0, key):
        def loss_fn(p):
            return flow_matching_loss(nnx.merge(graphdef, p, rest), ids, x0, key)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, ema, opt_state, loss

    return step


def pretrain(
    out: str | None,
    steps: int,
    batch: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.995,
    log_every: int = 50,
    warmup: int = 100,
    config: dict | None = None,
    eval_per_prompt: int = 4,
    eval_steps: int = 40,
    max_minutes: float | None = None,
) -> dict:
    """Train, save the EMA weights to ``out`` (if given) and return ``{"losses", "eval", ...}``."""
    config = config or default_config()
    transformer, text_model = build_models(config, seed)
    models = ToyModels(transformer, text_model)
    graphdef, params, rest = nnx.split(models, nnx.Param, ...)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    sched = optax.linear_schedule(0.0, lr, max(warmup, 1))  # then constant: a run cut at step n == --steps n
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=1e-4))
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    step_fn = make_train_step(graphdef, rest, tx, ema_decay)
    records = prompt_split("train")
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    losses, t0 = [], time.time()
    print(f"toy pretrain: {n_params} parameters, {steps} steps x batch {batch}", flush=True)
    for i in range(steps):
        imgs, metas = sample_batch(rng, records, batch)
        ids = jnp.asarray(tokenize([m["prompt"] for m in metas]))
        key, sub = jax.random.split(key)
        params, ema, opt_state, loss = step_fn(params, ema, opt_state, ids, encode_images(imgs), sub)
        losses.append(float(loss))
        if max_minutes is not None and time.time() - t0 > 60.0 * max_minutes:
            print(f"stopping after {i + 1} steps: --max-minutes {max_minutes} reached", flush=True)
            steps = i + 1
            break
        if (i + 1) % log_every == 0 or i == 0 or i + 1 == steps:
            recent = float(np.mean(losses[-log_every:]))
            print(f"step {i + 1}/{steps} loss {recent:.4f} ({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0
    final = nnx.merge(graphdef, ema, rest)
    result = {"losses": losses, "n_params": n_params, "train_seconds": train_s}
    if eval_per_prompt > 0:
        from awm_jax.toy.evaluate import evaluate_pipeline

        pipe = ToyPipeline(final.transformer, final.text_model, ToyTextEncoder(final.text_model), config)
        result["eval"] = evaluate_pipeline(pipe, "heldout", eval_per_prompt, seed=seed, steps=eval_steps)
        print("held-out strict accuracy:", json.dumps(result["eval"]), flush=True)
    if out is not None:
        save_toy_checkpoint(out, final.transformer, final.text_model, config)
        meta = {
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "ema_decay": ema_decay,
            "n_params": n_params,
            "train_seconds": round(train_s, 1),
            "final_loss": float(np.mean(losses[-log_every:])),
            "eval_heldout": result.get("eval"),
        }
        (pathlib.Path(out) / "eval.json").write_text(json.dumps(meta, indent=2) + "\n")
    return result


def main(argv=None) -> dict:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="awm_jax/toy/assets/toy_mmdit")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--eval-per-prompt", type=int, default=4)
    p.add_argument("--eval-steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop early (the LR is constant after warm-up, so a run stopped at step n equals --steps n)",
    )
    a = p.parse_args(argv)
    return pretrain(
        a.out,
        a.steps,
        a.batch,
        a.lr,
        a.seed,
        a.ema_decay,
        a.log_every,
        eval_per_prompt=a.eval_per_prompt,
        eval_steps=a.eval_steps,
        max_minutes=a.max_minutes,
    )


if __name__ == "__main__":
    main()
