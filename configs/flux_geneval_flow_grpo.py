"""FLUX.1-dev on geneval: the Flow-GRPO baseline (same base; only algorithm-specific keys differ).

Every key is documented in configs/awm_base.py; the FLUX-specific ones are commented in its flux().
"""

from awm_base import flux


def get_config():
    """Return the config."""
    return flux("geneval", algorithm="flow_grpo")
