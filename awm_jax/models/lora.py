"""LoRA adapters: the ``LoRAParam`` variable type, the target configuration and state helpers.

A LoRA adapter lives inside :class:`awm_jax.models.layers.Dense` as two variables of type
:class:`LoRAParam` (a subclass of ``nnx.Param``): ``lora_a (in, r)`` (Gaussian init, std ``1/r``) and
``lora_b (r, out)`` (zeros), and the layer adds ``(x @ a) @ b * alpha / r``. Because ``LoRAParam`` is a
``Param`` subclass, filters must list it first::

    graphdef, lora_state, base_state = nnx.split(model, LoRAParam, nnx.Param)

Which layers get an adapter is decided by :class:`LoRAConfig` from the layer's *diffusers-style* path
(``transformer_blocks.3.attn.to_out.0``) by PEFT's rule: a target matches when it equals the path or the
path ends with ``"." + target`` (``attn.to_q`` matches ``transformer_blocks.3.attn.to_q`` but not
``transformer_blocks.3.attn2.to_q``; a bare ``to_q`` matches both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# The public AWM / Flow-GRPO SD3.5 list: the joint attention ``attn`` only (PEFT's rule does not let
# ``attn.to_q`` match the dual-attention blocks' ``attn2.to_q``; a config that wants ``attn2`` names it).
SD35_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")


class LoRAParam(nnx.Param):
    """A trainable low-rank adapter weight (``lora_a`` / ``lora_b``); a ``Param`` subclass."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters: ``rank`` r, ``alpha`` (scale ``alpha / r``) and target module suffixes."""

    rank: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] = SD35_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if int(self.rank) <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules must not be empty")
        for t in self.target_modules:
            if not isinstance(t, str) or not t or t.startswith(".") or t.endswith("."):
                raise ValueError(f"LoRAConfig.target_modules: invalid target {t!r}")

    @property
    def scale(self) -> float:
        """The adapter output scale ``alpha / rank``."""
        return float(self.alpha) / int(self.rank)

    def matches(self, path: str) -> bool:
        """True if the diffusers-style module ``path`` is targeted (exact or dotted-suffix match)."""
        return any(path == t or path.endswith("." + t) for t in self.target_modules)


def lora_for(lora: LoRAConfig | None, path: str) -> LoRAConfig | None:
    """``lora`` if it targets the module at diffusers-style ``path``, else ``None``."""
    return lora if lora is not None and lora.matches(path) else None


def split_lora(model: nnx.Module):
    """Split a model into ``(graphdef, lora_state, base_state)`` (LoRA adapters vs. all other params)."""
    return nnx.split(model, LoRAParam, nnx.Param)


def zero_lora(lora_state):
    """A copy of ``lora_state`` with every ``lora_b`` zeroed (adapters become no-ops; ``lora_a`` kept).

    Accepts an ``nnx.State`` (Variables kept, metadata preserved) or a pure nested dict of arrays.
    """
    if isinstance(lora_state, nnx.State):
        flat = [(p, v.replace(value=jnp.zeros_like(v.get_value())) if p and p[-1] == "lora_b" else v)
                for p, v in nnx.to_flat_state(lora_state)]
        return nnx.from_flat_state(flat)

    def zero(path, x):
        return jnp.zeros_like(x) if any(_key_name(k) == "lora_b" for k in path) else x

    return jax.tree_util.tree_map_with_path(zero, lora_state)


def count_lora_params(lora_state) -> int:
    """Total number of scalar entries in a LoRA state."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(lora_state)))


def lora_paths(model: nnx.Module) -> Sequence[str]:
    """Dotted paths of every module that carries a LoRA adapter (for logging and tests)."""
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and getattr(node, "lora_a", None) is not None:
            out.append(".".join(str(p) for p in path))
    return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
