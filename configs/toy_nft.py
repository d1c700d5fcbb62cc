"""The toy shapes world with DiffusionNFT (same base model and rollout steps as configs/toy.py, DPM2 solver).

Keys that differ from the AWM config (set in configs/awm_base.py, every key documented there):

- algorithm = "nft"
- nft.beta = 1.0, nft.adaptive_weighting = True (the authors' defaults)
- awm.beta = 1e-4: KL weight to the reference (train.beta)
- awm.ema_beta = 0: no kl-EMA term; the kl-EMA adapter is the old policy, which also samples the rollouts
- ema.kl_decay_max = 0.5: old-policy decay min(0.001 step, 0.5) (decay_type 1)
- ema.eval_decay_max = 0.9: the authors' evaluation EMA decay
- sample.sampler = "dpm2": the authors' deterministic DPM2 rollouts (NVlabs/DiffusionNFT config/nft.py:66;
  the Euler "ode" before issue 30), at the toy's 20 steps
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy(algorithm="nft")
