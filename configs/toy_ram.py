"""The toy shapes world with RAM, Reinforce Adjoint Matching (base: configs/toy.py; docs/objectives.md).

Keys that differ from the AWM config (set in configs/awm_base.py ``_ram``, every key documented there):

- algorithm = "ram": loss mean (v - sg(v_ref + rho A (u - v_old)))^2, no KL term
- ram.rho = 100 (GenEval; second-hand, docs/objectives.md)
- advantages: "standard" (R - group mean) / std of all the step's rewards, no clip
- awm.beta = 0, awm.ema_beta = 0; optim.max_grad_norm = 5.0
- ema.kl_decay_max = 0.5: the old policy (kl-EMA adapter, samples the rollouts) d = min(0.001 step, 0.5)
- ema.eval_decay_max = 0.9
- sample.num_steps = 10 deterministic steps (sample.sampler = "dpm2"), awm.timestep_sampler =
  "permutation", awm.timestep_fraction = 0.99, awm.train_timesteps = 9 (the seed-004 port's times)
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy(algorithm="ram")
