"""The toy shapes world with the Flow-GRPO baseline (same base as configs/toy.py).

Every key is documented in configs/awm_base.py.
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy(algorithm="flow_grpo")
