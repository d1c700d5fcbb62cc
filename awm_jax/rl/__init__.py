"""awm_jax.rl: RL math for AWM and Flow-GRPO (model-agnostic, velocity closures in, scalars out).

Advantages (host numpy): :func:`group_advantages`, :class:`PerPromptStatTracker`,
:func:`awm_clip_advantages`, :func:`grpo_clip_advantages`,
:func:`reward_stats`, :func:`step_advantages` (the trainer's, from its config).  Training times:
:func:`sample_train_timesteps`, :func:`sample_train_noise`.
AWM: :func:`awm_log_prob`, :func:`policy_loss`, :func:`policy_loss_mean_over_times`, :func:`velocity_kl`,
:func:`awm_loss`.  Flow-GRPO: :func:`flow_grpo_step_loss`, :func:`flow_grpo_loss`, :func:`grpo_kl`.
The jitted train step lives in ``awm_jax.rl.train_step`` (not imported here).
"""

from awm_jax.rl.advantages import (
    PerPromptStatTracker,
    awm_clip_advantages,
    group_advantages,
    grpo_clip_advantages,
    reward_stats,
    step_advantages,
)
from awm_jax.rl.awm import (
    awm_log_prob,
    awm_loss,
    flow_matching_mse,
    kl_sigma,
    noised_latents,
    policy_loss,
    policy_loss_mean_over_times,
    repeat_over_times,
    velocity_kl,
)
from awm_jax.rl.grpo import flow_grpo_loss, flow_grpo_step_loss, grpo_kl, num_train_steps
from awm_jax.rl.timesteps import discrete_strata, sample_train_noise, sample_train_timesteps

__all__ = [
    "PerPromptStatTracker", "awm_clip_advantages", "awm_log_prob", "awm_loss", "discrete_strata",
    "flow_grpo_loss",
    "flow_grpo_step_loss", "flow_matching_mse", "group_advantages", "grpo_clip_advantages", "grpo_kl",
    "kl_sigma", "noised_latents", "num_train_steps", "policy_loss", "policy_loss_mean_over_times",
    "repeat_over_times", "reward_stats", "sample_train_noise", "sample_train_timesteps", "step_advantages",
    "velocity_kl",
]
