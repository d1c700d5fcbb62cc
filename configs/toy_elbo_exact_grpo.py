"""The toy shapes world with the PPO-clipped ratio of exact-weight ELBOs (same base as configs/toy.py).

Formerly ``configs/toy_elbo_grpo.py`` (algorithm ``elbo_grpo``, kept as a deprecated alias): this is NOT
seed 004's ELBO GRPO (configs/awm_base.py ``epg_grpo``); docs/objectives.md.

Keys that differ from the AWM config (set in configs/awm_base.py, every key documented there):

- algorithm = "elbo_exact_grpo": rollouts from the old policy (the kl-EMA adapter)
- awm.weighting = "elbo": per-time weight (1 - t) / t
- awm.clip_range = 0.2: PPO clip of the ratio of the ELBOs (mean over the K times)
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy(algorithm="elbo_exact_grpo")
