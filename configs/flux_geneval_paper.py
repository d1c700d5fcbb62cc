"""FLUX.1-dev on geneval: AWM, the paper's settings (Euler-Maruyama, 4 times, uniform w(t), no EMA term).

Every key is documented in configs/awm_base.py; the FLUX-specific ones are commented in its flux().
"""

from awm_base import flux


def get_config():
    """Return the config."""
    return flux("geneval", paper=True)
