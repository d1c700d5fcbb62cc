"""SD3.5-Medium on geneval: DiffusionNFT with the authors' sd3_geneval defaults.

Keys that differ from the AWM config (set in configs/awm_base.py, every key documented there):

- algorithm = "nft"; nft.beta = 1.0; nft.adaptive_weighting = True
- awm.beta = 1e-4 (KL to the reference); awm.ema_beta = 0
- ema.kl_decay_max = 0.5 (old policy); ema.eval_decay_max = 0.9
- sample.sampler = "dpm2" (the authors' solver, NVlabs/DiffusionNFT config/nft.py:65-66; "ode" before
  issue 30), sample.num_steps = 10, sample.noise_level = 0, sample.guidance_scale = 1 (no CFG)
- awm.train_timesteps = 9, awm.timestep_sampler = "discrete", awm.timestep_fraction = 0.99
- data.prompts_per_step = 48
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    return sd35m("geneval", algorithm="nft")
