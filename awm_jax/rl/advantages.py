"""Group-relative advantages and reward statistics (host-side numpy; jax arrays are accepted).

Group = all samples of one prompt.  Call these on the *globally gathered* rewards of a step.
"""

from __future__ import annotations

import numpy as np

from awm_jax.rl import registry


def _as_inputs(rewards, group_ids):
    r = np.asarray(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.floating):
        r = r.astype(np.float64)
    g = np.asarray(group_ids)
    if g.shape != r.shape:
        raise ValueError(f"group_ids shape {g.shape} must match rewards shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards contain non-finite values: {r[~np.isfinite(r)][:5]}")
    _, inv = np.unique(g, return_inverse=True)
    return r, inv.reshape(-1)


def group_advantages(rewards, group_ids, global_std: bool = True, eps: float = 1e-4) -> np.ndarray:
    """Per-prompt baseline: ``A_i = (r_i - mean_{same group} r) / (std + eps)`` -> (B,) numpy.

    ``std`` is the (population) std of all rewards when ``global_std`` (default, AWM / Flow-GRPO code),
    else the std of the sample's own group.  ``group_ids`` may be ints or strings (prompts).  No clipping.
    """
    r, inv = _as_inputs(rewards, group_ids)
    r64 = r.astype(np.float64)
    counts = np.bincount(inv)
    mean = np.bincount(inv, weights=r64) / counts
    centered = r64 - mean[inv]
    if global_std:
        std = np.full_like(r64, r64.std())
    else:
        std = np.sqrt(np.bincount(inv, weights=centered**2) / counts)[inv]
    return (centered / (std + eps)).astype(r.dtype)


class PerPromptStatTracker:
    """Stateful per-prompt tracker: baselines use every reward seen for a prompt since :meth:`clear`.

    ``update(prompts, rewards)`` returns ``(r - mean_prompt_history) / (std + eps)`` with the std of the
    current rewards (``global_std``) or of the prompt's history.  Right after ``clear()`` (the public code
    clears every epoch) this equals :func:`group_advantages`.
    """

    def __init__(self, global_std: bool = True, eps: float = 1e-4):
        self.global_std, self.eps = bool(global_std), float(eps)
        self.history: dict = {}

    def update(self, prompts, rewards) -> np.ndarray:
        r, _ = _as_inputs(rewards, np.asarray(prompts))
        r64 = r.astype(np.float64)
        keys = [p if isinstance(p, (str, int)) else str(p) for p in np.asarray(prompts).tolist()]
        for k, x in zip(keys, r64):
            self.history.setdefault(k, []).append(float(x))
        out = np.empty_like(r64)
        for k in set(keys):
            m = np.array([kk == k for kk in keys])
            h = np.asarray(self.history[k])
            std = r64.std() if self.global_std else h.std()
            out[m] = (r64[m] - h.mean()) / (std + self.eps)
        return out.astype(r.dtype)

    def clear(self) -> None:
        """Forget all prompt histories."""
        self.history = {}


def awm_clip_advantages(advantages, clip: float = 5.0, advantage_max: float = 1.0):
    """AWM clip and rescale: ``clip(A, -clip, clip) / clip * advantage_max`` (np or jnp)."""
    if clip <= 0:
        raise ValueError(f"advantage clip must be > 0, got {clip}")
    return advantages.clip(-clip, clip) / clip * advantage_max


def grpo_clip_advantages(advantages, clip: float = 5.0):
    """Flow-GRPO: ``(clip(A, -clip, clip), mask)`` where ``mask`` drops samples with ``A == 0`` exactly."""
    if clip <= 0:
        raise ValueError(f"advantage clip must be > 0, got {clip}")
    a = advantages.clip(-clip, clip)
    return a, a != 0


def reward_stats(rewards, group_ids, correct_threshold: float = 1.0) -> dict[str, float]:
    """Reward mean/std, fraction of groups with zero std, all-correct / all-wrong group fractions.

    A sample is "correct" when ``reward >= correct_threshold``.
    """
    r, inv = _as_inputs(rewards, group_ids)
    r = r.astype(np.float64)
    n = int(inv.max()) + 1 if inv.size else 0
    if n == 0:
        raise ValueError("reward_stats needs at least one reward")
    counts = np.bincount(inv, minlength=n)
    mean = np.bincount(inv, weights=r, minlength=n) / counts
    var = np.bincount(inv, weights=(r - mean[inv]) ** 2, minlength=n) / counts
    correct = (r >= correct_threshold).astype(np.float64)
    n_correct = np.bincount(inv, weights=correct, minlength=n)
    return {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "zero_std_frac": float(np.mean(var == 0)),
        "all_correct_frac": float(np.mean(n_correct == counts)),
        "all_wrong_frac": float(np.mean(n_correct == 0)),
    }


def exact_advantages(rewards, group_ids, scale: float = 0.1) -> np.ndarray:
    """Seed 004's "exact" advantage ``A_i = scale (r_i - mean_{same group} r)`` (no std, no clip) -> (B,)
    numpy; the authors' ``scale = BETA / ALPHA = 1e-4 / 1e-3`` (docs/objectives.md)."""
    r, inv = _as_inputs(rewards, group_ids)
    r64 = r.astype(np.float64)
    mean = np.bincount(inv, weights=r64) / np.bincount(inv)
    return (float(scale) * (r64 - mean[inv])).astype(r.dtype)


MODES = ("standard", "exact")


def step_advantages(rewards, group_ids, config) -> np.ndarray:
    """The trainer's advantages for one step, per ``config`` (float32 (B,) numpy).

    ``advantages.mode = "standard"``: :func:`group_advantages` over the globally gathered rewards
    (``advantages.std_mode``, ``advantages.eps``); ``"exact"``: :func:`exact_advantages`
    (``advantages.exact_scale``).  Then the objective's clipping (``awm_jax.rl.registry``): AWM, nft and
    elbo_exact_* :func:`awm_clip_advantages` (``advantages.clip``, ``awm.advantage_max``), Flow-GRPO
    :func:`grpo_clip_advantages` (its mask is applied in the loss); the seed-004 objectives and RAM none
    (epg_grpo clamps inside its loss).
    """
    a = config.advantages
    mode = str(a.mode)
    r = np.asarray(rewards, np.float64)
    if mode == "standard":
        adv = group_advantages(r, group_ids, global_std=a.std_mode == "global", eps=float(a.eps))
    elif mode == "exact":
        adv = exact_advantages(r, group_ids, float(a.exact_scale))
    else:
        raise ValueError(f"config key advantages.mode = {mode!r}: expected one of {MODES}")
    spec = registry.get(str(config.algorithm))
    if spec.kind == "trajectory":
        adv, _ = grpo_clip_advantages(adv, float(a.clip))
    elif spec.clip_advantages:
        adv = awm_clip_advantages(adv, float(a.clip), float(config.awm.advantage_max))
    return np.asarray(adv, np.float32)
