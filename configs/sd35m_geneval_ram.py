"""SD3.5-Medium on geneval: RAM, Reinforce Adjoint Matching (arXiv 2605.10759), as the port in the seed-004
repository runs it (jaemoo-choi/rethinking-diffusion-rl at c2570002365231487b1392c7aef3a13a069edf79,
src/utils/base.py, "ram" branch of compute_loss) on that repository's SD3 recipe (config/sd3.py).
The RAM repository itself was not readable: rho and the advantage normalisation are second-hand
(docs/objectives.md).

Keys that differ from the AWM config (set in configs/awm_base.py ``_ram``, every key documented there):

- algorithm = "ram"; ram.rho = 100
- advantages: "standard" over the std of all the step's rewards, no clip; awm.beta = 0, awm.ema_beta = 0
- ema.kl_decay_rate = 0.001, ema.kl_decay_max = 0.5 (old policy, samples the rollouts, moved per epoch)
- optim.max_grad_norm = 5.0; no CFG; ema.eval_decay_max = 0.9
- awm.timestep_sampler = "permutation", awm.timestep_fraction = 0.99, awm.train_timesteps = 9
- sample.sampler = "dpm2", sample.num_steps = 10, sample.noise_level = 0
- data.prompts_per_step = 48
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    return sd35m("geneval", algorithm="ram")
