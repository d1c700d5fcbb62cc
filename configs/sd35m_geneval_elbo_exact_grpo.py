"""SD3.5-Medium on geneval: the PPO-clipped ratio of exact-weight ELBOs on AWM's rollouts and times.

Formerly ``configs/sd35m_geneval_elbo_grpo.py`` (algorithm ``elbo_grpo``, a deprecated alias): NOT seed 004's
method (configs/sd35m_geneval_pepg.py is); docs/objectives.md.

Keys that differ from the AWM config (set in configs/awm_base.py, every key documented there):

- algorithm = "elbo_exact_grpo": rollouts from the old policy (the kl-EMA adapter)
- awm.weighting = "elbo": per-time weight (1 - t) / t
- awm.clip_range = 0.2: PPO clip of the ELBO ratio
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    return sd35m("geneval", algorithm="elbo_exact_grpo")
