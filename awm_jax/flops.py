"""Count a program's matmul FLOPs from its jaxpr, with loop trip counts.

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, whatever its trip count, so the FLOPs of
a program with scanned layers, a sampler's scan over steps or a micro-batch accumulation scan are those of
one iteration. :func:`jaxpr_flops` walks the jaxpr instead: ``dot_general`` and ``conv_general_dilated``
(2 FLOPs per multiply-add, the convention of MFU), nested calls counted once, ``scan`` bodies times their
``length``, ``cond`` as its costliest branch, ``shard_map`` bodies (per-device shapes) times the mesh
size. Element-wise work is left out (no part of MFU's numerator;
on the tiny test transformer XLA's count, which has it, is within 1.5x of this one).

Custom kernels (``pallas_call``: the splash flash-attention kernels, forward, dq and dkv) are counted from
their shapes: the kernel body's ``dot_general`` s on one block times the grid size (every grid step runs the
body once; the body's ``cond`` s, e.g. a skipped fully-masked block, count as their costliest branch). For
splash forward that is ``4 B H Lq Lk D`` at the padded lengths, the backward's dq + dkv kernels ~2.5x that.
Those FLOPs are also kept apart in ``Count.kernel_flops`` (``Count.kernels`` calls): XLA's own cost
analysis of a Mosaic custom call is not usable (it reported 7.8e6 FLOPs and ``optimal_seconds`` -2.0 for a
whole splash forward + backward), so the planner times them separately.

The count is of the traced program: a ``jax.grad`` inside it is counted with its backward pass, and an
activation-checkpointed (rematerialised) block with its recomputation. Trace the same step with remat off
for the "model FLOPs" of MFU. A ``while_loop`` whose trip count is not static is counted once and reported
in ``Count.uncounted_loops``.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Count", "jaxpr_flops", "traced_flops"]


@dataclasses.dataclass
class Count:
    flops: float = 0.0  # all matmul FLOPs, custom kernels included
    uncounted_loops: int = 0
    kernel_flops: float = 0.0  # the part in custom (Pallas / Mosaic) kernels
    kernels: int = 0  # custom kernel calls (loop trip counts included)

    def add(self, other: Count, times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.uncounted_loops += other.uncounted_loops
        self.kernel_flops += times * other.kernel_flops
        self.kernels += int(times) * other.kernels


def _pallas_flops(eqn) -> float:
    """A ``pallas_call``'s FLOPs: its body's matmuls on one block times the number of grid steps."""
    grid = getattr(eqn.params["grid_mapping"], "grid", ())
    steps = math.prod(int(g) for g in grid) if grid else 1
    return steps * jaxpr_flops(eqn.params["jaxpr"]).flops


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval.shape
    (contract_l, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs[d] for d in contract_l)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0]  # kernel: (out features, in features, *spatial) in rhs_spec order
    per_output = math.prod(rhs) / rhs[out_feature_dim]  # in features (per group) x kernel window
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(params: dict):
    for v in params.values():
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            inner = getattr(x, "jaxpr", x)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def jaxpr_flops(jaxpr) -> Count:
    """The :class:`Count` of a ``Jaxpr`` or ``ClosedJaxpr`` (global shapes: divide by the chips for one)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = Count()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total.flops += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total.flops += _conv_flops(eqn)
        elif name == "pallas_call":
            f = _pallas_flops(eqn)
            total.flops += f
            total.kernel_flops += f
            total.kernels += 1
        elif name == "shard_map":  # the body sees one device's shard: every device of the mesh runs it
            total.add(jaxpr_flops(eqn.params["jaxpr"]), times=int(eqn.params["mesh"].size))
        elif name == "scan":
            total.add(jaxpr_flops(eqn.params["jaxpr"]), times=int(eqn.params["length"]))
        elif name == "cond":
            branches = [jaxpr_flops(b) for b in eqn.params["branches"]]
            total.add(max(branches, key=lambda c: c.flops))
        elif name == "while":
            total.add(jaxpr_flops(eqn.params["body_jaxpr"]))
            total.add(jaxpr_flops(eqn.params["cond_jaxpr"]))
            total.uncounted_loops += 1
        else:  # pjit, remat, custom_jvp / custom_vjp calls, shard_map, ...: their bodies, once
            for sub in _sub_jaxprs(eqn.params):
                total.add(jaxpr_flops(sub))
    return total


def traced_flops(jitted, *args) -> Count:
    """:func:`jaxpr_flops` of ``jitted`` (a ``jax.jit`` function) traced at ``args`` (arrays or
    ``jax.ShapeDtypeStruct``; nothing is compiled or run)."""
    return jaxpr_flops(jitted.trace(*args).jaxpr)
