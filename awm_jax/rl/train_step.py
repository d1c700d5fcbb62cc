"""The jitted, sharded train step of every objective (``awm_jax.rl.registry``) and the train state.

The rollout samplers live in ``awm_jax.rl.rollout`` (re-exported here); the per-chunk losses of each objective
in ``awm_jax.rl.losses``; the model family's velocity and CFG in ``awm_jax.rl.policy``; placement on the mesh
in ``awm_jax.parallel``.

Contract (used by ``awm_jax.train``)::

    graphdef, base_state, state = create_train_state(model, config)
    step = make_train_step(graphdef, config, mesh)     # (state, base_state, batch, key) -> (state, metrics)
    rollout = make_rollout_fn(graphdef, config, mesh)  # (trainable, base_state, embeds, pooled, key) -> dict

**Parameters.** LoRA mode (default): the transformer is (re)built by its model family with adapters on
``config.lora.targets`` (empty: the family's default targets; rank, alpha, Gaussian ``A``, zero ``B``;
compute dtype ``config.model.dtype``); ``state.trainable`` is the fp32 LoRA state, ``base_state`` the frozen
base weights. The reference model is the *same* graphdef merged with the LoRA state whose ``B`` is zeroed
(no second copy of the weights) and the kl-EMA adapter is a second LoRA state. Full fine-tuning
(``config.lora.full_finetune``): ``trainable`` = every parameter (fp32) and ``base_state`` is a frozen copy
used as the reference, so parameter memory is ~ 3x (policy + reference + kl-EMA) plus 2x for Adam plus 1x
for the eval EMA: about 7 fp32 copies of the model (SD3.5-M, 2.5 B params: ~70 GB), against 1 copy + 7
copies of the adapters (~0.1 GB) with LoRA.


**Step.** One call = one optimizer step on all rollouts of an epoch: the batch of N samples is split into
M equal micro-batches (``config.train.micro_batch_size`` per batch shard) and, optionally, the K training
times (``config.train.scan_times``; AWM ``per_time`` loss only) into K chunks; a ``lax.scan`` accumulates the
fp32 gradients of the chunk losses and their mean is clipped (global norm) and applied with AdamW.  Then the
kl-EMA and eval-EMA are updated.  A non-finite loss or gradient leaves the whole state unchanged
(``metrics["finite"] = False``).  The state is donated; training noise and times are drawn per sample from
``key`` so results do not depend on the micro-batching or the mesh.

The other clean-sample objectives (``config.algorithm`` of kind "x0" in ``awm_jax.rl.registry``: nft,
elbo_exact_*, epg / pepg / par / epg_grpo, ram) use AWM's batch, chunks, times and noise; their old policy is
the kl-EMA state.

AWM batch: ``x0 (N,C,H,W), prompt_embeds (N,T,D), pooled (N,P), advantages (N,)`` (already clipped), optional
``times (K,N)``, ``noise (K,N,C,H,W)`` and ``logp_old (K,N)`` (all three needed for an external ``logp_old``).
Off-policy (``config.awm.on_policy = False``) without ``logp_old``: it is computed inside the step with the
kl-EMA adapter (the public code's off-policy mode also samples with that adapter: roll out with
``state.kl_ema``).  Flow-GRPO batch: the :func:`make_rollout_fn` trajectory (``latents (N,S+1,C,H,W)``,
``log_probs``, ``timesteps``, ``next_timesteps`` (N,S)) + embeddings + advantages.  CFG (guidance != 1) needs
the empty-prompt embeddings: ``negative=(embeds (1,T,D), pooled (1,P))`` for both factories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from awm_jax import parallel
from awm_jax.models.family import family_of, get_family
from awm_jax.models.lora import LoRAConfig, LoRAParam
from awm_jax.parallel import (
    batch_sharding,
    num_batch_shards,
    place,
    place_once,
    state_shardings,
)
from awm_jax.rl import ema as ema_lib
from awm_jax.rl import losses, registry
from awm_jax.rl.losses import key_str, micro_batch_size, zero_lora_b
from awm_jax.rl.policy import ALGORITHMS, algorithm, is_full_finetune, trains_on_x0, velocity_model
from awm_jax.rl.rollout import ROLLOUT_SAMPLERS, make_rollout_fn

__all__ = [
    "ALGORITHMS", "ROLLOUT_SAMPLERS", "TrainState", "create_train_state", "init_lora", "lora_config",
    "make_grad_fn", "make_optimizer", "make_rollout_fn", "make_train_step", "micro_batch_size",
    "velocity_model", "zero_lora_b",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed as is)."""

    step: jax.Array  # int32 scalar: optimizer steps completed
    trainable: Any  # LoRA state (or all params when full fine-tuning), fp32
    opt_state: Any  # optax AdamW state
    kl_ema: Any = None  # kl-EMA adapter (same structure as trainable) or None
    eval_ema: Any = None  # evaluation EMA or None


# ------------------------------------------------------------------------------------------ set-up


def _dtype(name) -> Any:
    if name is None:
        return None
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"config key model.dtype = {name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _needs_kl_ema(config) -> bool:
    """The kl-EMA adapter state exists: AWM's EMA term / off-policy, or the old policy of a registry objective
    that needs one (nft, elbo_exact_grpo, the seed-004 objectives, ram)."""
    a = algorithm(config)
    if registry.get(a).needs_old:
        return True
    return trains_on_x0(config) and (float(config.awm.ema_beta) != 0 or
                                     (a == "awm" and not bool(config.awm.on_policy)))


def lora_config(config, family=None) -> LoRAConfig:
    """:class:`LoRAConfig` from ``config.lora`` (only ``init = "gaussian"`` exists); empty ``lora.targets``
    means the model family's default targets."""
    if str(config.lora.init) != "gaussian":
        raise ValueError(f"config key lora.init = {config.lora.init!r}: only 'gaussian' is implemented")
    targets = tuple(config.lora.targets)
    if not targets:
        targets = tuple((family or get_family(str(config.model.kind))).lora_targets)
    return LoRAConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha), target_modules=targets)


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (constant lr), from ``config.optim``."""
    o = config.optim
    return optax.chain(
        optax.clip_by_global_norm(float(o.max_grad_norm)),
        optax.adamw(float(o.lr), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                    weight_decay=float(o.weight_decay)),
    )


def _flat_paths(state) -> set:
    return {p for p, _ in nnx.to_flat_state(state)}


def _rebuild(model, config, lora: LoRAConfig | None, seed: int):
    """Graphdef (+ initial LoRA state) of ``model`` rebuilt by its family with ``lora`` and the configured
    compute dtype (abstractly: no weights are allocated)."""
    fam = family_of(model, prefer=str(config.model.kind))
    kw = fam.rebuild_kwargs(model)
    kw.update(lora=lora, dtype=_dtype(config.model.dtype) or kw["dtype"])
    cfg = kw.pop("cfg")
    abstract = nnx.eval_shape(lambda: fam.build(cfg, rngs=nnx.Rngs(seed), **kw))
    if lora is None:
        graphdef, _ = nnx.split(abstract, nnx.Param)
        return graphdef, None
    graphdef, abs_lora, _ = nnx.split(abstract, LoRAParam, nnx.Param)
    return graphdef, init_lora(abs_lora, int(lora.rank), seed)


def init_lora(abstract_lora, rank: int, seed: int):
    """Fresh adapters for an (abstract) LoRA state: ``lora_a ~ N(0, 1/r^2)`` (std ``1/r``), ``lora_b = 0``."""
    key = jax.random.key(seed)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract_lora)):
        dtype = var.dtype if hasattr(var, "dtype") else jnp.float32
        if key_str(path[-1]) == "lora_b":
            value = jnp.zeros(var.shape, dtype)
        else:
            z = jax.random.normal(jax.random.fold_in(key, i), var.shape, jnp.float32)
            value = (z / rank).astype(dtype)
        flat.append((path, var.replace(value=value)))
    return nnx.from_flat_state(flat)


def _to_f32(tree):
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def create_train_state(model: nnx.Module, config, *, seed: int | None = None):
    """``(graphdef, base_state, TrainState)`` for ``model`` per ``config`` (see the module docstring).

    The model is rebuilt abstractly by its family with the configured LoRA targets and compute dtype (its
    base weights are reused, not copied); a model that already carries LoRA adapters keeps them.
    """
    seed = int(config.seed if seed is None else seed)
    tx = make_optimizer(config)
    if is_full_finetune(config):
        graphdef = _rebuild(model, config, None, seed)[0]
        params = nnx.state(model, nnx.Param)
        base_state = params  # the frozen reference
        trainable = _to_f32(params)
    else:
        has_lora = bool(jax.tree.leaves(nnx.state(model, LoRAParam)))
        if has_lora:
            graphdef, trainable, base_state = nnx.split(model, LoRAParam, nnx.Param)
        else:
            fam = family_of(model, prefer=str(config.model.kind))
            graphdef, trainable = _rebuild(model, config, lora_config(config, fam), seed)
            base_state = nnx.state(model, nnx.Param)
            _, _, abs_base = nnx.split(nnx.merge(graphdef, trainable, base_state), LoRAParam, nnx.Param)
            if _flat_paths(abs_base) != _flat_paths(base_state):
                raise ValueError("model parameters do not match the rebuilt LoRA model's base parameters")
        trainable = _to_f32(trainable)
    kl = ema_lib.init_ema(trainable) if _needs_kl_ema(config) else None
    ev = ema_lib.init_ema(trainable) if bool(config.ema.eval_ema) else None
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                       kl_ema=kl, eval_ema=ev)
    return graphdef, base_state, state


# ------------------------------------------------------------------------------------------ accumulation


_MIN_KEYS = ("ratio_min",)
_MAX_KEYS = ("ratio_max",)


def _accumulate(loss_and_grad: Callable, params, chunks, num: int):
    """``lax.scan`` over ``num`` chunks: mean of gradients (fp32) and of aux scalars (min/max for extrema)."""
    def body(carry, chunk):
        g_acc, a_acc = carry
        (_, aux), g = loss_and_grad(params, chunk)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        new = {}
        for k, v in aux.items():
            v = jnp.asarray(v, jnp.float32)
            new[k] = jnp.minimum(a_acc[k], v) if k in _MIN_KEYS else (
                jnp.maximum(a_acc[k], v) if k in _MAX_KEYS else a_acc[k] + v)
        return (g_acc, new), None

    g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    aux_shape = jax.eval_shape(lambda: loss_and_grad(params, jax.tree.map(lambda c: c[0], chunks))[0][1])
    a0 = {k: jnp.full((), jnp.inf if k in _MIN_KEYS else (-jnp.inf if k in _MAX_KEYS else 0.0), jnp.float32)
          for k in aux_shape}
    (g, a), _ = jax.lax.scan(body, (g0, a0), chunks)
    g = jax.tree.map(lambda x: x / num, g)
    a = {k: (v if k in _MIN_KEYS + _MAX_KEYS else v / num) for k, v in a.items()}
    return g, a


# ------------------------------------------------------------------------------------------ losses




def _make_grads(graphdef, config, mesh: Mesh | None) -> Callable:
    """``grads(state, base, batch, key, neg) -> (mean gradients (fp32), mean aux)`` (traceable)."""
    kind = registry.get(algorithm(config)).kind
    full = is_full_finetune(config)
    if trains_on_x0(config):
        num_k = int(config.awm.train_timesteps)
        if num_k < 1:
            raise ValueError(f"config key awm.train_timesteps = {num_k} must be >= 1")
    else:
        sampler = str(config.sample.sampler)
        if sampler not in ("sde", "cps"):
            raise ValueError(f"Flow-GRPO trains SDE/CPS trajectories; sample.sampler = {sampler!r}")

    def grads(state: TrainState, base, batch, key, neg):
        if kind != "trajectory":
            grid = losses.time_grid(graphdef, config, batch["x0"].shape[1:])
            chunks, num, k_chunk, k_noise = losses.awm_chunks(batch, key, config, mesh, num_k, grid)
            make = losses.awm_loss_fn if kind == "awm" else losses.objective_loss_fn
            loss_fn = make(graphdef, config, mesh, full, k_chunk, k_noise)
            ctx = state.kl_ema
        else:
            t1 = float(losses.time_grid(graphdef, config, batch["latents"].shape[2:])[1])
            chunks, num = losses.grpo_chunks(batch, config, mesh)
            loss_fn = losses.grpo_loss_fn(graphdef, config, mesh, full, t1, sampler)
            ctx = neg
        vg = jax.value_and_grad(lambda p, ch: loss_fn(p, base, ctx, ch), has_aux=True)
        return _accumulate(vg, state.trainable, chunks, num)

    return grads


def make_grad_fn(graphdef, config, mesh: Mesh | None = None, *, negative=None) -> Callable:
    """Jitted ``grad_fn(state, base_state, batch, key) -> (grads, aux)``: the accumulated gradient the train
    step applies (same placement rules; for tests, debugging and gradient-noise studies)."""
    inner = _make_grads(graphdef, config, mesh)
    return _placed_call(jax.jit(inner), config, mesh, negative, donate=False)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(graphdef, config, mesh: Mesh | None = None, *, negative=None,
                    max_traces: int | None = None) -> Callable:
    """The jitted train step ``step(state, base_state, batch, key) -> (state, metrics)`` (module docstring).

    ``mesh``: a ``(data, fsdp, tensor)`` mesh (``awm_jax.parallel.make_mesh``) or None (default device).
    ``negative``: empty-prompt ``(embeds (1,T,D), pooled (1,P))`` for CFG in Flow-GRPO training.
    ``max_traces``: wrap the step in ``chex.assert_max_traces`` (raises on an unexpected re-trace).
    ``metrics``: loss, policy_loss, kl, (kl_ema), ratio/clip statistics, grad_norm, finite, step.
    """
    algorithm(config)
    tx = make_optimizer(config)
    o = config.optim
    e = config.ema
    kl_rate, kl_max = float(e.kl_decay_rate), float(e.kl_decay_max)
    grads_fn = _make_grads(graphdef, config, mesh)

    def step(state: TrainState, base, batch, key, neg):
        params = state.trainable
        grads, aux = grads_fn(state, base, batch, key, neg)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(aux["loss"]) & _all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_step = state.step + 1
        kl = state.kl_ema
        if kl is not None:  # per optimizer step; with epoch parts (rl.epoch) once per epoch, after its last
            kl_new = ema_lib.kl_ema_update(kl, new_params, batch.get("epoch", new_step), kl_rate, kl_max)
            if "epoch_end" in batch:
                kl_new = jax.tree.map(lambda a, b: jnp.where(batch["epoch_end"], a, b), kl_new, kl)
            kl = kl_new
        ev = state.eval_ema
        if ev is not None:
            ev = ema_lib.eval_ema_update(ev, new_params, new_step, float(e.eval_decay_max),
                                         int(e.eval_every))
        new = TrainState(new_step, new_params, opt_state, kl, ev)
        out = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = dict(aux)
        metrics.update(grad_norm=grad_norm, finite=finite, step=out.step, lr=jnp.float32(o.lr),
                       kl_ema_decay=ema_lib.kl_ema_decay(batch.get("epoch", new_step), kl_rate, kl_max))
        return out, metrics

    if max_traces is not None:
        import chex

        step = chex.assert_max_traces(step, n=int(max_traces))

    def factory(st_sh, rep):
        kw = {} if mesh is None else {"out_shardings": (st_sh, rep)}
        return jax.jit(step, donate_argnums=(0,), **kw)

    return _placed_call(factory, config, mesh, negative, donate=True)


def _placed_call(jitted, config, mesh: Mesh | None, negative, donate: bool) -> Callable:
    """Wrap a jitted ``f(state, base, batch, key, neg)``: checks the batch and places every input on the
    mesh (state per the logical rules, batch over (data, fsdp), the unchanging base state once).
    With ``donate``, ``jitted`` is a factory ``(state_shardings, replicated) -> jitted function``."""
    algo = algorithm(config)
    cache: dict = {}

    def run(state, base_state, batch: dict, key):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None}
        _check_batch(batch, algo)
        if "fn" not in cache:
            st_sh = state_shardings(state, mesh)
            rep = None if mesh is None else parallel.replicated(mesh)
            cache["sh"] = (st_sh, state_shardings(base_state, mesh), rep)
            cache["fn"] = jitted(st_sh, rep) if donate else jitted
        st_sh, base_sh, rep = cache["sh"]
        state = place(state, st_sh)
        base = place_once(base_state, base_sh)
        if mesh is not None:
            n = batch["advantages"].shape[0]
            if n % num_batch_shards(mesh):
                raise ValueError(f"train batch of {n} samples is not divisible by the "
                                 f"{num_batch_shards(mesh)} "
                                 f"batch shards of mesh {dict(mesh.shape)} (data x fsdp)")
            batch = {k: place(v, _batch_entry_sharding(mesh, k, v.ndim)) for k, v in batch.items()}
            key = parallel.put(key, rep)
        neg = None if negative is None else tuple(jnp.asarray(x) for x in negative)
        with parallel.activation_mesh(mesh, bool(config.mesh.constrain_activations)):  # at trace
            return cache["fn"](state, base, batch, key, neg)

    def trace(state, base_state, batch: dict, key):
        """``jax.jit(...).trace`` of the same function on abstract inputs (``jax.ShapeDtypeStruct``; state and
        base per the logical rules, batch over (data, fsdp)): its jaxpr (FLOP count) and ``.lower()`` (AOT
        compiles for another topology; ``awm_jax.plan``)."""
        st_sh = state_shardings(state, mesh)
        rep = None if mesh is None else parallel.replicated(mesh)
        fn = jitted(st_sh, rep) if donate else jitted

        def spec(x, sh):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

        def batch_sh(k, v):
            return None if mesh is None else _batch_entry_sharding(mesh, k, len(v.shape))

        args = (jax.tree.map(spec, state, st_sh), jax.tree.map(spec, base_state,
                                                                  state_shardings(base_state, mesh)),
                {k: spec(v, batch_sh(k, v)) for k, v in batch.items()}, spec(key, rep))
        neg = None if negative is None else tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
                                                  for x in negative)
        with parallel.activation_mesh(mesh, bool(config.mesh.constrain_activations)):
            return fn.trace(*args, neg)

    run.trace = trace
    return run


def _batch_entry_sharding(mesh: Mesh, key: str, ndim: int) -> NamedSharding:
    """Rows over (data, fsdp); the per-time entries on their second axis; scalars (epoch_end, epoch)
    replicated."""
    if ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    if key in ("times", "noise", "logp_old"):
        return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    return batch_sharding(mesh, ndim)


_AWM_KEYS = ("x0", "prompt_embeds", "pooled", "advantages")
_GRPO_KEYS = ("latents", "log_probs", "timesteps", "next_timesteps", "prompt_embeds", "pooled", "advantages")


def _check_batch(batch: dict, algo: str) -> None:
    trajectory = registry.get(algo).kind == "trajectory"
    need = _GRPO_KEYS if trajectory else _AWM_KEYS
    missing = [k for k in need if k not in batch]
    if missing:
        raise KeyError(f"{algo} train batch lacks keys {missing} (has {sorted(batch)})")
    n = batch["advantages"].shape[0]
    for k in need:
        if batch[k].shape[0] != n:
            raise ValueError(f"{algo} train batch: {k} has leading size {batch[k].shape[0]}, advantages {n}")
    if not trajectory:
        extra = [k for k in ("times", "noise", "logp_old") if k in batch]
        if "logp_old" in extra and not {"times", "noise"} <= set(extra):
            raise ValueError("batch['logp_old'] needs the 'times' and 'noise' it was computed with")
