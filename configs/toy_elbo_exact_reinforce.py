"""The toy shapes world with REINFORCE on the exact-weight ELBO (same base as configs/toy.py).

Formerly ``configs/toy_elbo_reinforce.py`` (algorithm ``elbo_reinforce``, kept as a deprecated alias): this is
NOT seed 004's ELBO policy gradient (configs/toy_pepg.py, toy_epg.py); docs/objectives.md.

Keys that differ from the AWM config (set in configs/awm_base.py, every key documented there):

- algorithm = "elbo_exact_reinforce"
- awm.weighting = "elbo": per-time weight (1 - t) / t of a velocity error
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy(algorithm="elbo_exact_reinforce")
