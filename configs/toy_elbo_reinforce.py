"""The toy shapes world with REINFORCE on the flow-matching ELBO (same base and rollouts as configs/toy.py).

Keys that differ from the AWM config (set in configs/awm_base.py, every key documented there):

- algorithm = "elbo_reinforce"
- awm.weighting = "elbo": per-time weight (1 - t) / t
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy(algorithm="elbo_reinforce")
