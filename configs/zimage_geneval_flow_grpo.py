"""Z-Image on geneval: the Flow-GRPO baseline (same base; only algorithm-specific keys differ).

Every key is documented in configs/awm_base.py; the Z-Image-specific ones are commented in
configs/awm_families.py:zimage().
"""

from awm_families import zimage


def get_config():
    """Return the config."""
    return zimage("geneval", algorithm="flow_grpo")
