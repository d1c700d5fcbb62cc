"""The toy shapes world with seed 004's EPG (same base as configs/toy.py; docs/objectives.md).

Keys that differ from the AWM config (set in configs/awm_base.py _seed004, every key documented there):

- algorithm = "epg"; elbo.likelihood = "adaptive" (per (time, sample) ratio and ELBO)
- advantages.mode = "exact", advantages.exact_scale = 0.1: A = 0.1 (R - group mean), no std, no clip
- awm.beta = 1e-4 (girsanov KL), awm.ema_beta = 0; optim.max_grad_norm = 5.0
- ema.kl_decay_max = 0.5: the old policy (kl-EMA adapter, samples the rollouts) d = min(0.001 step, 0.5)
- ema.eval_decay_max = 0.9
- the authors' rollout geometry instead of the toy's 20 steps / K = 6: sample.num_steps = 10 deterministic
  steps (sample.sampler = "dpm2"), awm.timestep_sampler = "permutation", awm.timestep_fraction =
  0.99, awm.train_timesteps = 9 (a random 9 of the 10 grid times per sample)
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy(algorithm="epg")
