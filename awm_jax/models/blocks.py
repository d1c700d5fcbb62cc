"""Transformer blocks shared by the model families (SD3 / SD3.5 MMDiT, FLUX.1), numerically like diffusers.

- :func:`linear`: a :class:`~awm_jax.models.layers.Dense` that gets a LoRA adapter when the build context's
  :class:`~awm_jax.models.lora.LoRAConfig` targets its diffusers-style path.
- :class:`MLPEmbedder`: ``linear_1 -> silu -> linear_2`` (diffusers ``TimestepEmbedding`` and
  ``PixArtAlphaTextProjection(act_fn="silu")``).
- :class:`TimestepTextEmbedding`: ``timestep_embedder(sincos_256(t)) [+ guidance_embedder(sincos_256(g))]
  + text_embedder(pooled)`` (diffusers ``CombinedTimestep[Guidance]TextProjEmbeddings``).
- :class:`AdaLayerNormZero`: adaLN-Zero with *named* modulation fields (``Modulation``); the field list
  selects the variant (6 fields: ``AdaLayerNormZero``, 9: ``SD35AdaLayerNormZeroX``, 3:
  ``AdaLayerNormZeroSingle``).
- :class:`AdaLayerNormContinuous`, :class:`FeedForward` (``"gelu-approximate"``), :func:`qk_norm`.
- :class:`Attention`: self attention or joint attention over a second (context) stream, with a configurable
  token order (SD3: sample tokens first; FLUX: context tokens first), an optional rotary hook applied to
  q and k after their norms (:func:`apply_rotary`), and optional output projections.
- :func:`remat_policy`, :func:`make_stack`, :func:`scan_stack`: scan/loop stacking of identical blocks
  (leading parameter axis named ``layers``); the per-layer <-> stacked state layout is in
  :mod:`awm_jax.models.stacking`.

The build context ``ctx`` is a dict ``{"dtype", "param_dtype", "rngs", "lora"}``; every block takes its own
diffusers-style ``path`` so LoRA targets match diffusers module names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from awm_jax import parallel
from awm_jax.models.attention import SPLASH_RESIDUALS, dot_product_attention, resolve
from awm_jax.models.layers import Dense, LayerNorm, RMSNorm, gelu_tanh, timestep_embedding
from awm_jax.models.lora import lora_for

EPS = 1e-6
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable", "save_attention")
ATTENTION_OUT = "attention_out"  # jax.ad_checkpoint name of every Attention's kernel output
QK_NORMS = (None, "rms_norm", "layer_norm", "fp32_layer_norm")

# modulation field names of the adaLN-Zero variants (in diffusers' chunk order)
ADALN_ZERO = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
ADALN_ZERO_X = ADALN_ZERO + ("shift_msa2", "scale_msa2", "gate_msa2")
ADALN_ZERO_SINGLE = ("shift_msa", "scale_msa", "gate_msa")


def linear(cin: int, cout: int, names: tuple, path: str, ctx: dict, use_bias: bool = True) -> Dense:
    """``Dense(cin, cout)`` with logical axis ``names`` and LoRA if ``ctx["lora"]`` targets ``path``."""
    return Dense(cin, cout, use_bias=use_bias, dtype=ctx["dtype"], param_dtype=ctx["param_dtype"],
                 sharding_names=names, lora=lora_for(ctx["lora"], path), rngs=ctx["rngs"])


# ------------------------------------------------------------------------------------------ embeddings


class MLPEmbedder(nnx.Module):
    """``linear_2(silu(linear_1(x)))``."""

    def __init__(self, cin: int, d: int, path: str, ctx: dict):
        self.linear_1 = linear(cin, d, (None, "embed"), f"{path}.linear_1", ctx)
        self.linear_2 = linear(d, d, ("embed", "mlp"), f"{path}.linear_2", ctx)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimestepTextEmbedding(nnx.Module):
    """diffusers ``CombinedTimestepTextProjEmbeddings`` / ``CombinedTimestepGuidanceTextProjEmbeddings``.

    ``timestep`` and ``guidance`` are in the units the caller's transformer feeds the sinusoid (SD3: 0..1000;
    FLUX multiplies its [0, 1] inputs by 1000 before calling this).
    """

    def __init__(self, d: int, pooled_dim: int, path: str, ctx: dict, *, guidance: bool = False):
        self.timestep_embedder = MLPEmbedder(256, d, f"{path}.timestep_embedder", ctx)
        self.guidance_embedder = MLPEmbedder(256, d, f"{path}.guidance_embedder", ctx) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, d, f"{path}.text_embedder", ctx)

    def __call__(self, timestep, pooled, guidance=None):
        def proj(t):
            emb = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)
            return emb.astype(pooled.dtype)

        emb = self.timestep_embedder(proj(timestep))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this transformer has a guidance embedding (guidance_embeds=True): "
                                 "pass guidance")
            emb = emb + self.guidance_embedder(proj(guidance))
        return emb + self.text_embedder(pooled)


# ------------------------------------------------------------------------------------------ norms, MLP


class Modulation(dict):
    """Named adaLN modulation vectors ``(B, D)``; fields read as attributes (``m.gate_msa``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"modulation has no field {name!r} (fields: {list(self)})") from None


def modulate(x, shift, scale):
    """``x * (1 + scale) + shift`` with per-sample ``(B, D)`` vectors broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nnx.Module):
    """adaLN-Zero: ``linear(silu(temb))`` split into the named ``fields``; returns ``(out, norm(x), mods)``
    with ``out = modulate(norm(x), mods.shift_msa, mods.scale_msa)``."""

    def __init__(self, d: int, fields: Sequence[str], path: str, ctx: dict):
        self.fields = tuple(fields)
        self.linear = linear(d, len(self.fields) * d, ("embed", "mlp"), f"{path}.linear", ctx)
        self.norm = LayerNorm(d, eps=EPS, elementwise_affine=False, dtype=ctx["dtype"])

    def __call__(self, x, temb):
        chunks = jnp.split(self.linear(jax.nn.silu(temb)), len(self.fields), axis=-1)
        mods = Modulation(zip(self.fields, chunks))
        nx = self.norm(x)
        return modulate(nx, mods.shift_msa, mods.scale_msa), nx, mods


class AdaLayerNormContinuous(nnx.Module):
    """``modulate(norm(x), shift, scale)`` with ``(scale, shift) = linear(silu(cond))`` (no affine)."""

    def __init__(self, d: int, path: str, ctx: dict):
        self.linear = linear(d, 2 * d, ("embed", "mlp"), f"{path}.linear", ctx)
        self.norm = LayerNorm(d, eps=EPS, elementwise_affine=False, dtype=ctx["dtype"])

    def __call__(self, x, cond):
        scale, shift = jnp.split(self.linear(jax.nn.silu(cond).astype(x.dtype)), 2, axis=-1)
        return modulate(self.norm(x), shift, scale)


class GELU(nnx.Module):
    """diffusers ``GELU(approximate="tanh")``: ``gelu_tanh(proj(x))``."""

    def __init__(self, d: int, inner: int, path: str, ctx: dict):
        self.proj = linear(d, inner, ("embed", "mlp"), f"{path}.proj", ctx)

    def __call__(self, x):
        return parallel.constrain(gelu_tanh(self.proj(x)), ("batch",) + (None,) * (x.ndim - 2) + ("mlp",))


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: ``net = [GELU, None, Linear]``."""

    def __init__(self, d: int, path: str, ctx: dict, mult: int = 4):
        inner = d * mult
        self.net = nnx.List([GELU(d, inner, f"{path}.net.0", ctx), None,
                             linear(inner, d, ("mlp", "embed"), f"{path}.net.2", ctx)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


def qk_norm(kind: str | None, head_dim: int, ctx: dict, eps: float = EPS):
    """The per-head q/k norm of diffusers' ``Attention(qk_norm=kind, eps=eps)`` (None: no norm)."""
    if kind not in QK_NORMS:
        raise ValueError(f"qk_norm={kind!r} unsupported; one of {QK_NORMS}")
    if kind is None:
        return None
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps=eps, dtype=ctx["dtype"], param_dtype=ctx["param_dtype"])
    if kind == "layer_norm":
        return LayerNorm(head_dim, eps=eps, elementwise_affine=True, dtype=ctx["dtype"],
                         param_dtype=ctx["param_dtype"])
    return LayerNorm(head_dim, eps=eps, elementwise_affine=False, dtype=ctx["dtype"])  # fp32_layer_norm


# ------------------------------------------------------------------------------------------ attention


def apply_rotary(x, rotary):
    """diffusers ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)``.

    ``x`` is ``(B, L, heads, head_dim)``; ``cos``/``sin`` are ``(L, head_dim)`` (or per sample
    ``(B, L, head_dim)``) with each frequency repeated for the (real, imaginary) pair of adjacent features.
    Computed in float32, returned in ``x.dtype``.
    """
    cos, sin = rotary
    cos, sin = (c[:, :, None, :] if c.ndim == 3 else c[None, :, None, :] for c in (cos, sin))
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos + rotated * sin
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """diffusers ``Attention`` with the joint processors of SD3 (``JointAttnProcessor2_0``) and FLUX
    (``FluxAttnProcessor``).

    ``joint``: a context stream with its own ``add_{q,k,v}_proj`` (and ``norm_added_{q,k}``) attends together
    with the sample stream; ``context_first`` orders the joint sequence ``[context, sample]`` (FLUX) instead
    of ``[sample, context]`` (SD3). ``out_proj``: ``to_out[0]`` on the sample output (False: FLUX's
    single-stream ``pre_only`` attention); ``context_out``: ``to_add_out`` on the context output (False: SD3's
    context-pre-only last block). ``rotary=(cos, sin)`` (over the joint sequence, in its order) is applied to
    q and k after their norms; ``mask`` (B, S) is an optional boolean key mask over that sequence.
    ``use_bias`` / ``out_bias``: biases of the q/k/v and output projections; ``qk_eps``: the q/k norms' eps.
    The kernel is the build context's ``"attention"`` (``model.attention``; see
    :mod:`awm_jax.models.attention`), stored as the static attribute ``attention_kernel``; a key ``mask`` runs
    on the XLA path whatever the kernel.
    """

    def __init__(self, d: int, heads: int, head_dim: int, path: str, ctx: dict, *, qk_norm_kind=None,
                 joint: bool = False, context_first: bool = False, out_proj: bool = True,
                 context_out: bool = True, use_bias: bool = True, out_bias: bool = True, qk_eps: float = EPS):
        inner = heads * head_dim
        self.heads, self.head_dim, self.dtype = heads, head_dim, ctx["dtype"]
        self.joint, self.context_first = joint, context_first
        self.attention_kernel = ctx.get("attention", "xla")
        self.to_q = linear(d, inner, ("embed", "heads"), f"{path}.to_q", ctx, use_bias)
        self.to_k = linear(d, inner, ("embed", "heads"), f"{path}.to_k", ctx, use_bias)
        self.to_v = linear(d, inner, ("embed", "heads"), f"{path}.to_v", ctx, use_bias)
        self.norm_q = qk_norm(qk_norm_kind, head_dim, ctx, qk_eps)
        self.norm_k = qk_norm(qk_norm_kind, head_dim, ctx, qk_eps)
        if joint:
            self.add_q_proj = linear(d, inner, ("embed", "heads"), f"{path}.add_q_proj", ctx)
            self.add_k_proj = linear(d, inner, ("embed", "heads"), f"{path}.add_k_proj", ctx)
            self.add_v_proj = linear(d, inner, ("embed", "heads"), f"{path}.add_v_proj", ctx)
            self.norm_added_q = qk_norm(qk_norm_kind, head_dim, ctx)
            self.norm_added_k = qk_norm(qk_norm_kind, head_dim, ctx)
        else:
            self.add_q_proj = self.add_k_proj = self.add_v_proj = None
            self.norm_added_q = self.norm_added_k = None
        self.to_out = (nnx.List([linear(inner, d, ("heads", "embed"), f"{path}.to_out.0", ctx, out_bias)])
                       if out_proj else None)
        self.to_add_out = (linear(inner, d, ("heads", "embed"), f"{path}.to_add_out", ctx)
                           if joint and context_out else None)

    def _heads(self, x, norm):
        y = x.reshape(*x.shape[:-1], self.heads, self.head_dim)
        return y if norm is None else norm(y)

    def __call__(self, x, context=None, rotary=None, mask=None):
        """``(B, N, d)`` sample [+ ``(B, T, d)`` context] -> ``(sample_out, context_out or None)``."""
        q = self._heads(self.to_q(x), self.norm_q)
        k = self._heads(self.to_k(x), self.norm_k)
        v = self._heads(self.to_v(x), None)
        n = x.shape[1]
        if context is not None:
            cq = self._heads(self.add_q_proj(context), self.norm_added_q)
            ck = self._heads(self.add_k_proj(context), self.norm_added_k)
            cv = self._heads(self.add_v_proj(context), None)
            order = (lambda a, c: (c, a)) if self.context_first else (lambda a, c: (a, c))
            q, k, v = (jnp.concatenate(order(a, c), axis=1) for a, c in ((q, cq), (k, ck), (v, cv)))
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        q, k, v = (parallel.constrain(a, ("batch", None, "heads", None)) for a in (q, k, v))
        o = dot_product_attention(q, k, v, implementation=self.attention_kernel, dtype=self.dtype or x.dtype,
                                  mask=mask)
        o = checkpoint_name(o, ATTENTION_OUT)
        o = o.reshape(*o.shape[:2], self.heads * self.head_dim)
        if context is None:
            return (o if self.to_out is None else self.to_out[0](o)), None
        t = o.shape[1] - n
        sample, ctx_out = (o[:, t:], o[:, :t]) if self.context_first else (o[:, :n], o[:, n:])
        if self.to_out is not None:
            sample = self.to_out[0](sample)
        if self.to_add_out is not None:
            ctx_out = self.to_add_out(ctx_out)
        return sample, ctx_out


# ------------------------------------------------------------------------------------------ stacking


def model_context(model: nnx.Module, config, *, rngs, dtype, param_dtype, scan_layers: bool,
                  remat_policy: str, lora, attention: str = "xla") -> dict:
    """Set the attributes every family's transformer carries (``config, dtype, param_dtype, scan_layers,
    remat_policy, lora, attention``: what ``ModelFamily.rebuild_kwargs`` reads) and return the build
    context."""
    block_caller(remat_policy)  # validate early
    resolve(attention)
    model.config, model.dtype, model.param_dtype = config, dtype, param_dtype
    model.scan_layers, model.remat_policy, model.lora = bool(scan_layers), remat_policy, lora
    model.attention = attention
    return {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "lora": lora, "attention": attention}


def remat_policy(name: str):
    """``jax.checkpoint`` policy of a ``remat_policy`` name (validated); ``"none"`` and ``"full"`` -> None."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r} unsupported; one of {REMAT_POLICIES}")
    # save_attention: recompute the block but the attention (its output, splash's residuals). With splash
    # (a custom_vjp inside shard_map) jax 0.10's remat does not see the residual names: the kernel's forward
    # re-runs in the backward as under "full" (same FLOPs, 18 vs 12 kernel calls in a 3-block model), and the
    # saved outputs only cost memory; it saves the attention recompute with model.attention = "xla".
    if name == "save_attention":
        return jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, SPLASH_RESIDUALS)
    return {"dots_saveable": jax.checkpoint_policies.dots_saveable,
            "nothing_saveable": jax.checkpoint_policies.nothing_saveable}.get(name)


def stream_names(ndim: int) -> tuple:
    """Logical names of a batch-leading activation (the residual stream ``(B, L, D)``): batch only."""
    return ("batch",) + (None,) * (ndim - 1)


def _call(block, *args):
    # the streams a block returns stay batch-sharded on (data, fsdp) (parallel.constrain; no-op without an
    # activation mesh), so XLA gathers each layer's FSDP-sharded weights inside the layer loop
    return tuple(parallel.constrain(o, stream_names(o.ndim)) for o in block(*args))


def block_caller(policy: str) -> Callable:
    """``call(block, *args) -> block(*args)``, rematerialised per ``policy`` (``"none"``: plain call)."""
    return _call if policy == "none" else nnx.remat(_call, policy=remat_policy(policy))


def make_stack(factory: Callable[[dict], nnx.Module], count: int, ctx: dict) -> nnx.Module:
    """``count`` blocks ``factory(ctx)`` stacked on a leading parameter axis named ``layers`` (for scan)."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return factory({**ctx, "rngs": r})

    return make(ctx["rngs"])


def scan_stack(stack: nnx.Module, carry, *static, policy: str = "none"):
    """Run a stacked block group: ``carry = block(*carry, *static)`` for each layer, in order.

    ``carry`` is a tuple of arrays threaded through the layers (the block returns a tuple of the same
    structure); ``static`` arguments (e.g. the time embedding, rotary tables) are broadcast to every layer.
    """
    call = block_caller(policy)
    n = len(static)

    @nnx.scan(in_axes=(0, nnx.Carry) + (None,) * n, out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def body(block, c, *s):
        return tuple(call(block, *c, *s))

    return body(stack, tuple(carry), *static)
