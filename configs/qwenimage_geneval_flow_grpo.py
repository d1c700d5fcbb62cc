"""Qwen-Image on geneval: the Flow-GRPO baseline (same base; only algorithm-specific keys differ).

Every key is documented in configs/awm_base.py; the Qwen-Image-specific ones are commented in
configs/awm_families.py:qwenimage().
"""

from awm_families import qwenimage


def get_config():
    """Return the config."""
    return qwenimage("geneval", "flow_grpo")
