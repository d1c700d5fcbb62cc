"""Per-chunk losses of every objective over micro-batched rollouts (used by ``awm_jax.rl.train_step``).

A train step splits its batch of N samples into M micro-batches (:func:`micro_batch_size`, ``split_micro``)
and, optionally, AWM's K training times into chunks; ``awm_chunks`` / ``grpo_chunks`` stack the per-chunk
inputs and ``awm_loss_fn`` / ``objective_loss_fn`` / ``grpo_loss_fn`` build the function
``(params, base, ctx, chunk) -> (loss, aux)`` the step differentiates and accumulates.  Clean-sample
objectives (AWM and every registry objective of kind "x0") share one prologue (:func:`_noised_inputs`:
the chunk's x0, conditioning, times and noise, drawn per sample so that results do not depend on the
micro-batching or the mesh).
The reference model is the trainable LoRA state with ``B = 0`` (:func:`zero_lora_b`) or, when fully
fine-tuning, the frozen base.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from awm_jax.parallel import constrain_batch, num_batch_shards
from awm_jax.rl import awm as awm_lib
from awm_jax.rl import grpo as grpo_lib
from awm_jax.rl import registry
from awm_jax.rl.policy import algorithm, guided, model_family, velocity_model
from awm_jax.rl.timesteps import sample_train_timesteps

__all__ = ["awm_chunks", "awm_loss_fn", "grpo_chunks", "grpo_loss_fn", "key_str", "micro_batch_size",
           "objective_loss_fn", "per_sample_noise", "ref_params", "split_micro", "time_grid", "zero_lora_b"]


# ------------------------------------------------------------------------------------------ reference model


def key_str(k) -> str:
    """The name of one tree-path entry (dict key, attribute or index) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def zero_lora_b(lora_state):
    """``lora_state`` with every ``lora_b`` zeroed (the reference model: adapters become no-ops).

    (``awm_jax.models.lora.zero_lora`` tests only the last path key, which for an ``nnx.State`` leaf is the
    Variable's ``value`` attribute, so it zeroes nothing; this version looks for ``lora_b`` in the path.)
    """
    def zero(path, x):
        return jnp.zeros_like(x) if any(key_str(k) == "lora_b" for k in path) else x

    return jax.tree_util.tree_map_with_path(zero, lora_state)


def ref_params(trainable, base, full: bool):
    """Reference-model parameters: the frozen base (full) or the adapters with ``B = 0`` (LoRA)."""
    return base if full else zero_lora_b(trainable)


# ------------------------------------------------------------------------------------------ micro-batches


def micro_batch_size(n: int, config, mesh: Mesh | None) -> int:
    """Global micro-batch: the largest divisor of ``n`` that is <= micro_batch_size x batch shards and a
    multiple of the batch shards."""
    shards = num_batch_shards(mesh)
    target = max(1, int(config.train.micro_batch_size)) * shards
    for d in range(min(n, target), 0, -1):
        if n % d == 0 and d % shards == 0:
            return d
    raise ValueError(f"batch of {n} samples cannot be split over {shards} batch shards (mesh data x fsdp); "
                     f"make the number of rollouts per step a multiple of {shards}")


def split_micro(x, m: int, axis: int = 0):
    """``(..., N, ...) -> (M, ..., N/M, ...)`` with micro-batch j = samples {i M + j} (keeps shards local)."""
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(x.shape[0] // m, m, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)  # (M, mb, ...)
    return jnp.moveaxis(x, 1, axis + 1)


def per_sample_noise(key, idx, num_times: int, shape):
    """``(K, b, *shape)`` N(0, 1) noise; sample ``n`` from ``fold_in(key, n)`` (micro-batch invariant)."""
    def one(i):
        return jax.random.normal(jax.random.fold_in(key, i), (num_times, *shape), jnp.float32)

    z = jax.vmap(one)(idx)
    return jnp.swapaxes(z, 0, 1)


# ------------------------------------------------------------------------------------------ losses


def time_grid(graphdef, config, latent_shape) -> np.ndarray:
    """The family's sampling grid for these latents (training times index it)."""
    fam = model_family(graphdef, config)
    return fam.time_grid(int(config.sample.num_steps), float(config.sample.shift), tuple(latent_shape))


def awm_chunks(batch, key, config, mesh, shape_k: int, grid: np.ndarray):
    """Stacked per-chunk inputs ``(num_chunks, ...)`` of the AWM step and the number of chunks."""
    w = config.awm
    x0 = batch["x0"]
    n = x0.shape[0]
    k_t, k_n = jax.random.split(key)
    times = batch.get("times")
    if times is None:
        times = sample_train_timesteps(k_t, str(w.timestep_sampler), shape_k, n, grid=grid,
                                       timestep_fraction=float(w.timestep_fraction),
                                       shift=float(config.sample.shift), draw=str(w.timestep_draw))
    mb = micro_batch_size(n, config, mesh)
    m = n // mb
    c = {"x0": x0, "emb": batch["prompt_embeds"], "pooled": batch["pooled"],
         "adv": jnp.asarray(batch["advantages"], jnp.float32), "idx": jnp.arange(n, dtype=jnp.int32)}
    c = {k: split_micro(v, m) for k, v in c.items()}
    c["times"] = split_micro(times.astype(jnp.float32), m, axis=1)  # (M, K, mb)
    if batch.get("noise") is not None:
        c["noise"] = split_micro(batch["noise"], m, axis=1)
    if batch.get("logp_old") is not None:
        c["logp_old"] = split_micro(batch["logp_old"], m, axis=1)
    c = {k: constrain_batch(v, mesh, axis=2 if k in ("times", "noise", "logp_old") else 1)
         for k, v in c.items()}
    scan_times = bool(config.train.scan_times)
    if scan_times and str(w.loss_type) != "per_time":
        raise ValueError("config key train.scan_times needs awm.loss_type = 'per_time'")
    if scan_times and registry.get(algorithm(config)).needs_all_times:
        raise ValueError(f"config key train.scan_times = True: {algorithm(config)}'s loss needs all K "
                         "times of a sample at once")
    if not scan_times:
        return c, m, shape_k, k_n
    # (M, K, mb, ...) -> (M * K, 1, mb, ...): one chunk per (micro-batch, time)
    out = {}
    for k, v in c.items():
        if k in ("times", "noise", "logp_old"):
            out[k] = v.reshape(m * shape_k, 1, *v.shape[2:])
        else:
            out[k] = jnp.repeat(v, shape_k, axis=0)
    out["time_index"] = jnp.tile(jnp.arange(shape_k, dtype=jnp.int32), m)
    return out, m * shape_k, 1, k_n


def _noised_inputs(ch, mesh, k_noise, k_total: int, num_times: int):
    """The shared prologue of the clean-sample objectives on one chunk: ``x0`` (fp32), training ``times``
    ``(k, mb)``, ``noise`` (the batch's, else drawn per sample: the sample's K_total draws, or the chunk's one
    time of them when times are scanned) and the conditioning repeated over the chunk's ``num_times``."""
    x0 = constrain_batch(ch["x0"].astype(jnp.float32), mesh)
    cond = (constrain_batch(ch["emb"], mesh), constrain_batch(ch["pooled"], mesh))
    if "noise" in ch:
        noise = ch["noise"]
    else:
        z = per_sample_noise(k_noise, ch["idx"], k_total, x0.shape[1:])  # (K_total, mb, ...)
        noise = z if "time_index" not in ch else jax.lax.dynamic_slice_in_dim(z, ch["time_index"], 1, 0)
    noise = constrain_batch(noise, mesh, axis=1)
    return x0, ch["times"], noise, awm_lib.repeat_over_times(cond, num_times)


def awm_loss_fn(graphdef, config, mesh, full: bool, num_times: int, k_noise) -> Callable:
    """``(params, (base, kl_ema, chunk)) -> ((loss, aux), grads)`` for one AWM chunk."""
    w = config.awm
    model_fn = velocity_model(graphdef, config)
    on_policy = bool(w.on_policy)
    k_total = int(w.train_timesteps)

    def loss(params, base, kl_ema, ch):
        x0, times, noise, rep = _noised_inputs(ch, mesh, k_noise, k_total, num_times)

        def vf(p):
            return lambda x, t: model_fn(p, base, x, t, rep)

        logp_old = ch.get("logp_old")
        if logp_old is None and not on_policy:
            logp_old = jax.lax.stop_gradient(_awm_logp(vf(kl_ema), x0, times, noise, w))
        ref = vf(ref_params(params, base, full)) if float(w.beta) != 0 else None
        ema = vf(kl_ema) if (kl_ema is not None and float(w.ema_beta) != 0) else None
        return awm_lib.awm_loss(
            vf(params), x0, ch["adv"], times, noise, velocity_fn_ref=ref, velocity_fn_ema=ema,
            logp_old=logp_old, weighting=str(w.weighting), ghuber_power=float(w.ghuber_power),
            clip_range=float(w.clip_range), beta=float(w.beta), ema_beta=float(w.ema_beta),
            kl_elbo=bool(w.kl_elbo), loss_type=str(w.loss_type), fold_times=True)

    return loss


def _awm_logp(vf, x0, times, noise, w):
    k, b = times.shape
    xt = awm_lib.noised_latents(x0, times, noise)
    v = vf(xt.reshape(k * b, *xt.shape[2:]), times.reshape(-1)).astype(jnp.float32)
    x0k = jnp.broadcast_to(x0[None], xt.shape).reshape(k * b, *x0.shape[1:])
    lp = awm_lib.awm_log_prob(v, noise.reshape(k * b, *noise.shape[2:]), x0k, times.reshape(-1),
                              str(w.weighting), float(w.ghuber_power))
    return lp.reshape(k, b)


def _resolve(path: str) -> Callable:
    """``"module:function"`` -> the function (the registry names losses lazily)."""
    mod, _, fn = path.partition(":")
    return getattr(importlib.import_module(mod), fn)


def objective_loss_fn(graphdef, config, mesh, full: bool, num_times: int, k_noise) -> Callable:
    """``(params, base, kl_ema, chunk) -> (loss, aux)`` of a registry objective of kind ``"x0"`` (nft,
    elbo_exact_*, epg / pepg / par / epg_grpo, ram; ``awm_jax.rl.registry``) on the AWM chunks: times, noise
    and micro-batches as AWM; the old policy's velocity from the kl-EMA adapter state, the reference model's
    from the zeroed adapters (or the frozen base), each computed only when the objective or its KL needs
    it."""
    w = config.awm
    spec = registry.get(algorithm(config))
    if spec.kind != "x0":
        raise ValueError(f"config key algorithm = {spec.name!r} has its own loss path, not objective_loss_fn")
    model_fn = velocity_model(graphdef, config)
    k_total = int(w.train_timesteps)
    hyper = spec.hyper(config)
    fn = _resolve(spec.loss)
    beta, ema_beta = float(w.beta), float(w.ema_beta)

    def loss(params, base, kl_ema, ch):
        x0, times, noise, rep = _noised_inputs(ch, mesh, k_noise, k_total, num_times)
        xt = awm_lib.noised_latents(x0, times, noise)
        k, b = times.shape

        def v_of(p):
            v = model_fn(p, base, xt.reshape(k * b, *xt.shape[2:]), times.reshape(-1), rep)
            return v.astype(jnp.float32).reshape(xt.shape)

        out = {"v": v_of(params)}
        if spec.needs_old:
            out["v_old"] = jax.lax.stop_gradient(v_of(kl_ema))
        if spec.needs_ref or beta != 0:
            out["v_ref"] = jax.lax.stop_gradient(v_of(ref_params(params, base, full)))
        if ema_beta != 0 and kl_ema is not None:  # the old policy *is* the kl-EMA adapter: one pass
            out["v_ema"] = out["v_old"] if "v_old" in out else jax.lax.stop_gradient(v_of(kl_ema))
        return fn(out, {"x0": x0, "noise": noise, "times": times, "adv": ch["adv"]}, **hyper)

    return loss


def grpo_chunks(batch, config, mesh):
    """Stacked per-(micro-batch, train step) inputs of the Flow-GRPO step."""
    lat = batch["latents"]
    n, s_plus = lat.shape[0], lat.shape[1]
    s_train = grpo_lib.num_train_steps(s_plus - 1, float(config.flow_grpo.timestep_fraction))
    mb = micro_batch_size(n, config, mesh)
    m = n // mb
    per_sample = {"emb": batch["prompt_embeds"], "pooled": batch["pooled"],
                  "adv": jnp.asarray(batch["advantages"], jnp.float32)}
    per_step = {"x": lat[:, :s_train], "x_next": lat[:, 1:s_train + 1],
                "lp_old": batch["log_probs"][:, :s_train],
                "t": batch["timesteps"][:, :s_train], "t_next": batch["next_timesteps"][:, :s_train]}
    c = {k: jnp.repeat(split_micro(v, m), s_train, axis=0) for k, v in per_sample.items()}  # (M*S, mb, ...)
    for k, v in per_step.items():
        v = jnp.swapaxes(split_micro(v, m), 1, 2)  # (M, S, mb, ...)
        c[k] = v.reshape(m * s_train, *v.shape[2:])
    return {k: constrain_batch(v, mesh, axis=1) for k, v in c.items()}, m * s_train


def grpo_loss_fn(graphdef, config, mesh, full: bool, t1: float, kind: str) -> Callable:
    g = config.flow_grpo
    model_fn = velocity_model(graphdef, config)
    scale = float(config.sample.guidance_scale)
    detach = bool(g.cfg_detach_uncond)

    def loss(params, base, neg, ch):
        cond = (constrain_batch(ch["emb"], mesh), constrain_batch(ch["pooled"], mesh))
        adv = ch["adv"]
        ref = None
        if float(g.beta) != 0:
            ref = guided(model_fn, ref_params(params, base, full), base, cond, neg, scale)
        return grpo_lib.flow_grpo_step_loss(
            guided(model_fn, params, base, cond, neg, scale, detach), constrain_batch(ch["x"], mesh),
            constrain_batch(ch["x_next"], mesh), ch["t"], ch["t_next"], adv, ch["lp_old"],
            noise_level=float(config.sample.noise_level), t1=t1, clip_range=float(g.clip_range),
            beta=float(g.beta), velocity_fn_ref=ref, mask=(adv != 0).astype(jnp.float32), kind=kind)

    return loss
