"""The attention kernel behind every family's :class:`~awm_jax.models.blocks.Attention` (config key
``model.attention``): ``"xla"`` (``jax.nn.dot_product_attention``, XLA's fusion: the ``(B, H, Lq, Lk)`` scores
are materialised), ``"splash"`` (the Pallas TPU flash kernel ``jax.experimental.pallas.ops.tpu.
splash_attention``), ``"cudnn"`` (``jax.nn.dot_product_attention(..., implementation="cudnn")``, cuDNN's
fused flash attention on NVIDIA GPUs) or ``"auto"`` (splash on TPU, cuDNN on GPU for 16-bit compute, XLA
otherwise). All take and return ``(B, L, heads, head_dim)`` with scale ``1 / sqrt(head_dim)``.

**Splash.** The kernel is one head group of one example: ``(H, Lq, D)`` queries, full (non-causal)
attention. Here it is ``vmap``-ed over the batch and, when a mesh is active (:func:`awm_jax.parallel.
activation_mesh`), wrapped in ``shard_map`` over that mesh: the batch over the mesh axes the rule table gives
``batch`` (``data`` x ``fsdp``) and the heads over those of ``heads`` (``tensor``), each only where the size
divides (else that dimension is replicated). Mosaic calls cannot be partitioned automatically, so without
``shard_map`` a multi-device program would not compile. Queries are pre-multiplied by ``1 / sqrt(D)`` (the
kernel applies no scale).

*Lengths that are not a block multiple.* Both sequences are zero-padded at the end to a multiple of the block
size and the padded **keys** are masked out with a static mask (``NumpyMask``, real keys ``kv < L``), so
every real query's softmax runs over the real keys only; padded query rows attend to the real keys too (no
empty rows, no NaN) and are sliced off the output. Gradients flow through the pad/slice unchanged. The block
is the largest of 512 / 256 / 128 whose padded length stays within 10 % of the length padded to 128 (big
blocks keep the MXU busy; the padding costs FLOPs): SD3.5 at 512 px (1024 image + 333 text = 1357 tokens)
-> block 512, padded to 1536 (9 % over 1408: 13 % padded keys, all masked); FLUX at 512 px (1024 + 512 =
1536) -> block 512, no padding; FLUX at 1024 px (4096 + 512 = 4608) -> block 512, no padding.

Off TPU, ``"splash"`` runs the same kernel in Pallas interpret mode (slow; what the CPU parity tests use).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_KINDS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCKS = (512, 256, 128)
SPLASH_RESIDUALS = "attention_residuals"  # jax.ad_checkpoint name of splash's saved output + logsumexp
_PAD_SLACK = 1.10  # a bigger block may pad up to 10 % more than the 128-multiple


def platform(mesh=None) -> str:
    """The platform the program is built for: the mesh's devices' (an AOT plan targets TPU from a CPU
    host), else JAX's default backend."""
    if mesh is not None:
        return str(np.asarray(mesh.devices).flat[0].platform)
    return jax.default_backend()


def resolve(kind: str, dtype=None, mesh=None) -> str:
    """The concrete kernel of ``kind`` (``"auto"`` per platform; unknown names raise)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"config key model.attention = {kind!r}: expected one of {ATTENTION_KINDS}")
    if kind != "auto":
        return kind
    p = platform(mesh)
    if p == "tpu":
        return "splash"
    if p == "gpu" and dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def splash_block(length: int) -> tuple[int, int]:
    """``(block, padded length)`` of the splash kernel for a sequence of ``length`` tokens."""
    base = -(-length // 128) * 128
    for b in SPLASH_BLOCKS:
        padded = -(-length // b) * b
        if padded <= base * _PAD_SLACK:
            return b, padded
    return 128, base


def _splash_kernel(heads: int, q_len: int, kv_len: int, padded: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if kv_len == padded:
        one = sm.FullMask((padded, padded))
    else:
        m = np.zeros((padded, padded), np.bool_)
        m[:, :kv_len] = True
        one = sm.NumpyMask(m)
    # the fused backward kernel (dq and dk/dv in one pass over the blocks): ~2.5x the forward's FLOPs where
    # the separate dq + dkv kernels recompute the scores twice (~3.5x; counted by awm_jax.flops)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, residual_checkpoint_name=SPLASH_RESIDUALS,
                              interpret=interpret)


def _splash_local(q, k, v, interpret: bool):
    """Splash on local ``(B, H, L, D)`` blocks (q already scaled): pad, vmap the kernel over B, slice."""
    b, h, n, d = q.shape
    block, padded = splash_block(n)
    if padded != n:
        pad = ((0, 0), (0, 0), (0, padded - n), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    kernel = _splash_kernel(h, n, n, padded, block, interpret)
    out = jax.vmap(kernel)(q, k, v)
    return out[:, :, :n]


def splash_attention(q, k, v, *, mesh=None, interpret: bool | None = None):
    """Splash attention on ``(B, L, H, D)`` (see the module docstring), in ``q.dtype``."""
    from awm_jax import parallel

    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"splash attention needs q, k, v of one shape (self/joint attention), got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    mesh = parallel.current_mesh() if mesh is None else mesh
    interpret = platform(mesh) != "tpu" if interpret is None else interpret
    scale = 1.0 / np.sqrt(q.shape[-1])
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in ((q * scale).astype(q.dtype), k, v))  # (B, H, L, D)
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh is not None and mesh.size > 1:
        spec = parallel.logical_to_spec(("batch", "heads", None, None), qh.shape, mesh)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return jnp.swapaxes(local(qh, kh, vh), 1, 2)


def dot_product_attention(q, k, v, *, implementation: str = "xla", dtype=None, mask=None):
    """Softmax attention on ``(B, L, heads, head_dim)`` tensors, scale ``1/sqrt(head_dim)``, in ``dtype``,
    with the kernel ``implementation`` (one of :data:`ATTENTION_KINDS`). ``mask``: an optional boolean key
    mask ``(B, S)`` (False: a padded key, ignored); masked attention (Z-Image / Qwen-Image text padding)
    always runs on the XLA path."""
    from awm_jax import parallel

    dtype = dtype or q.dtype
    q, k, v = (t.astype(dtype) for t in (q, k, v))
    if mask is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask, bool)[:, None, None, :])
    mesh = parallel.current_mesh()
    kind = resolve(implementation, dtype, mesh)
    if kind == "splash":
        return splash_attention(q, k, v, mesh=mesh)
    if kind == "cudnn":
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"model.attention = 'cudnn' needs a 16-bit compute dtype (model.dtype), got "
                             f"{jnp.dtype(dtype).name}")
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v)


def set_attention(model, kind: str):
    """Use kernel ``kind`` in every attention module of ``model`` (any family built on the shared
    :class:`~awm_jax.models.blocks.Attention`); records it as ``model.attention``. Returns ``model``."""
    resolve(kind)  # validate
    for _, m in model.iter_modules():
        if hasattr(m, "attention_kernel"):
            m.attention_kernel = kind
    model.attention = kind
    return model
