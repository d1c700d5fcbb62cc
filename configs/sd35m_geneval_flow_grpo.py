"""SD3.5-Medium on geneval: the Flow-GRPO baseline (same base; only algorithm-specific keys differ).

Every key is documented in configs/awm_base.py.
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    return sd35m("geneval", algorithm="flow_grpo")
