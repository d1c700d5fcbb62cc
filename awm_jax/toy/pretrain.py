"""Pretrain the toy SD3.5-architecture MMDiT + toy text encoder on the shapes world.

    python -m awm_jax.toy.pretrain --out awm_jax/toy/assets/toy_mmdit --steps 1500

Flow matching (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, logit-normal ``t``) on images
rendered on the fly from the *train* prompt split, AdamW with linear warm-up then a constant LR, an EMA of
the weights (the EMA is what is saved). At the end the EMA model is evaluated on the held-out split
with a 40-step Euler ODE (``awm_jax.toy.evaluate``) and the result is written to ``eval.json``.

``--objective noisy_xs`` is the paper's variance experiment (its Eq. 8, adapted to flow matching): the
regression target is built from a *noisy* sample ``x_s`` (``s = max(t - gap, 0)``, as a DDPO step of size
``gap`` sees) instead of the clean ``x0``.  With ``x_t = a x_s + sigma z``, ``a = (1 - t) / (1 - s)``,
``sigma^2 = t^2 - a^2 s^2``, the noisy conditional score ``-(x_t - a x_s) / sigma^2`` gives the data
estimate ``x0_hat = (x_t + t^2 score) / (1 - t)`` and the velocity target ``(x_t - x0_hat) / t``: unbiased
for ``eps - x0`` given ``x_t`` (same minimiser), with ``s^2 / (t^2 (1-s)^2 - s^2 (1-t)^2)`` more variance per
dimension (Theorem 2's ``kappa`` in velocity units).  ``--curve-every n`` logs, every n steps, the
clean-target validation loss on a fixed batch (comparable across objectives) and the held-out accuracy of
the EMA model to ``curve.jsonl``.
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


OBJECTIVES = ("clean_x0", "noisy_xs")


def noisy_velocity_target(x0, t, key, gap: float):
    """(x_t, velocity target) of the noisy-x_s objective (module docstring); ``t`` is (B,)."""
    k1, k2 = jax.random.split(key)
    tt = t[:, None, None, None]
    ss = jnp.maximum(tt - gap, 0.0)
    xs = (1.0 - ss) * x0 + ss * jax.random.normal(k1, x0.shape, x0.dtype)
    a = (1.0 - tt) / (1.0 - ss)
    var = jnp.maximum(tt**2 - (a * ss) ** 2, 1e-12)  # sigma^2(t, s) > 0 for s < t
    xt = a * xs + jnp.sqrt(var) * jax.random.normal(k2, x0.shape, x0.dtype)
    score = -(xt - a * xs) / var
    x0_hat = (xt + tt**2 * score) / (1.0 - tt)
    return xt, (xt - x0_hat) / tt


def flow_matching_loss(models: ToyModels, ids, x0, key, objective: str = "clean_x0", gap: float = 0.1):
    """Mean squared velocity error with logit-normal t (clean ``eps - x0`` or the noisy-x_s target)."""
    k_t, k_eps = jax.random.split(key)
    b = x0.shape[0]
    t = jax.nn.sigmoid(jax.random.normal(k_t, (b,)))
    if objective == "clean_x0":
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        tt = t[:, None, None, None]
        xt, target = (1.0 - tt) * x0 + tt * eps, eps - x0
    elif objective == "noisy_xs":
        t = jnp.clip(t, 1e-3, 1.0 - 1e-3)  # the x0 estimate divides by t and 1 - t
        xt, target = noisy_velocity_target(x0, t, k_eps, gap)
    else:
        raise ValueError(f"unknown pretraining objective {objective!r}; valid: {OBJECTIVES}")
    emb, pooled = models.text_model(ids)
    v = models.transformer(
        hidden_states=xt, encoder_hidden_states=emb, pooled_projections=pooled, timestep=1000.0 * t
    )
    return jnp.mean((v.astype(jnp.float32) - target) ** 2)


def make_train_step(graphdef, rest, tx, ema_decay: float, objective: str = "clean_x0", gap: float = 0.1):
    """Jitted ``step(params, ema, opt_state, ids, x0, key) -> (params, ema, opt_state, loss)``."""

    @jax.jit
    def step(params, ema, opt_state, ids, x0, key):
        def loss_fn(p):
            return flow_matching_loss(nnx.merge(graphdef, p, rest), ids, x0, key, objective, gap)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, ema, opt_state, loss

    return step


def make_val_loss(graphdef, rest, n: int = 256, seed: int = 1234):
    """Jitted ``val(params) -> clean flow-matching loss`` on a fixed held-out batch, t and noise."""
    rng = np.random.default_rng(seed)
    imgs, metas = sample_batch(rng, prompt_split("heldout"), n)
    ids, x0 = jnp.asarray(tokenize([m["prompt"] for m in metas])), encode_images(imgs)
    key = jax.random.key(seed)

    @jax.jit
    def val(params):
        return flow_matching_loss(nnx.merge(graphdef, params, rest), ids, x0, key, "clean_x0")

    return val


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
    eval_per_tag: int = 48,
    eval_steps: int = 40,
    max_minutes: float | None = None,
    objective: str = "clean_x0",
    gap: float = 0.1,
    curve_every: int = 0,
    curve_per_tag: int = 16,
) -> dict:
    """Train, save the EMA weights to ``out`` (if given) and return ``{"losses", "eval", "curve", ...}``."""
    from awm_jax.toy.evaluate import evaluate_pipeline

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown pretraining objective {objective!r}; valid: {OBJECTIVES}")
    config = config or default_config()
    transformer, text_model = build_models(config, seed)
    models = ToyModels(transformer, text_model)
    graphdef, params, rest = nnx.split(models, nnx.Param, ...)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    sched = optax.linear_schedule(0.0, lr, max(warmup, 1))  # then constant: a run cut at step n == --steps n
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=1e-4))
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    step_fn = make_train_step(graphdef, rest, tx, ema_decay, objective, gap)
    val_fn = make_val_loss(graphdef, rest) if curve_every > 0 else None
    records = prompt_split("train")
    curve_split = f"heldout@{curve_per_tag}"
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    losses, curve, t0, eval_s = [], [], time.time(), 0.0

    def pipeline_of(state):
        m = nnx.merge(graphdef, state, rest)
        return ToyPipeline(m.transformer, m.text_model, ToyTextEncoder(m.text_model), config)

    def log_curve(step):
        nonlocal eval_s
        te = time.time()
        ev = evaluate_pipeline(pipeline_of(ema), curve_split, 1, seed=seed, steps=eval_steps)
        point = {
            "step": step,
            "train_seconds": round(time.time() - t0 - eval_s, 1),
            "train_loss": float(np.mean(losses[-curve_every:])) if losses else None,
            "val_loss_clean": float(val_fn(ema)),
            "accuracy": ev["accuracy"],
            "partial_score": ev["partial_score"],
        }
        curve.append(point)
        if out is not None:
            pathlib.Path(out).mkdir(parents=True, exist_ok=True)
            with open(pathlib.Path(out) / "curve.jsonl", "a") as f:
                f.write(json.dumps(point) + "\n")
        eval_s += time.time() - te
        print(
            f"curve step {step}: val {point['val_loss_clean']:.4f} overall {ev['accuracy']['overall']:.3f}",
            flush=True,
        )

    if out is not None and curve_every > 0:
        (pathlib.Path(out) / "curve.jsonl").unlink(missing_ok=True)
    print(f"toy pretrain ({objective}): {n_params} parameters, {steps} steps x batch {batch}", flush=True)
    for i in range(steps):
        imgs, metas = sample_batch(rng, records, batch)
        ids = jnp.asarray(tokenize([m["prompt"] for m in metas]))
        key, sub = jax.random.split(key)
        params, ema, opt_state, loss = step_fn(params, ema, opt_state, ids, encode_images(imgs), sub)
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"toy pretrain: loss is {losses[-1]} at step {i + 1}")
        if curve_every > 0 and (i + 1) % curve_every == 0:
            log_curve(i + 1)
        if max_minutes is not None and time.time() - t0 - eval_s > 60.0 * max_minutes:
            print(f"stopping after {i + 1} steps: --max-minutes {max_minutes} reached", flush=True)
            steps = i + 1
            break
        if (i + 1) % log_every == 0 or i == 0 or i + 1 == steps:
            recent = float(np.mean(losses[-log_every:]))
            print(f"step {i + 1}/{steps} loss {recent:.4f} ({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0 - eval_s
    final = nnx.merge(graphdef, ema, rest)
    result = {"losses": losses, "n_params": n_params, "train_seconds": train_s, "curve": curve}
    if eval_per_tag > 0:
        result["eval"] = evaluate_pipeline(
            pipeline_of(ema), f"heldout@{eval_per_tag}", 1, seed=seed, steps=eval_steps
        )
        print("held-out strict accuracy:", json.dumps(result["eval"]), flush=True)
    if out is not None:
        save_toy_checkpoint(out, final.transformer, final.text_model, config)
        meta = {
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "ema_decay": ema_decay,
            "objective": objective,
            "gap": gap,
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
    p.add_argument("--out", default="runs/toy_pretrain/toy_mmdit",
                   help="output folder (the committed model: awm_jax/toy/assets/toy_mmdit)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--eval-per-tag", type=int, default=48, help="final eval: held-out images per tag")
    p.add_argument("--eval-steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop early (the LR is constant after warm-up, so a run stopped at step n equals --steps n)",
    )
    p.add_argument("--objective", default="clean_x0", choices=OBJECTIVES)
    p.add_argument("--gap", type=float, default=0.1, help="noisy_xs: s = max(t - gap, 0)")
    p.add_argument("--curve-every", type=int, default=0, help="log val loss + accuracy every n steps")
    p.add_argument("--curve-per-tag", type=int, default=16, help="curve evals: held-out images per tag")
    p.add_argument(
        "--transformer",
        default="{}",
        help='JSON overrides of the toy transformer config, e.g. {"patch_size": 1}',
    )
    a = p.parse_args(argv)
    config = default_config()
    try:
        over = json.loads(a.transformer)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--transformer is not valid JSON ({e}): {a.transformer!r}") from e
    unknown = sorted(set(over) - set(config["transformer"]))
    if unknown:
        raise SystemExit(f"--transformer: unknown keys {unknown}; valid: {sorted(config['transformer'])}")
    config["transformer"].update(over)
    return pretrain(
        a.out,
        a.steps,
        a.batch,
        a.lr,
        a.seed,
        a.ema_decay,
        a.log_every,
        eval_per_tag=a.eval_per_tag,
        eval_steps=a.eval_steps,
        max_minutes=a.max_minutes,
        config=config,
        objective=a.objective,
        gap=a.gap,
        curve_every=a.curve_every,
        curve_per_tag=a.curve_per_tag,
    )


if __name__ == "__main__":
    main()
