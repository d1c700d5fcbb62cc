"""SD3.5-Large on geneval: AWM with the SD3.5-M GenEval recipe (the AWM code ships no Large config).

The architecture is ``model.arch = "sd3.5-large"`` (``SD3Family.architectures``: the diffusers config of
stabilityai/stable-diffusion-3.5-large, 38 blocks x 2432 wide); memory settings from the TPU plans in
BENCHMARKS.md ("TPU plan"). Every key is documented in configs/awm_base.py.
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    c = sd35m("geneval")
    c.model.arch = "sd3.5-large"
    c.model.path = "weights/sd3.5-large"  # the diffusers pipeline folder of SD3.5-Large
    return c
