"""FLUX.1-dev on ocr: AWM, the public AWM code's defaults adapted to FLUX.

Every key is documented in configs/awm_base.py; the FLUX-specific ones are commented in its flux().
"""

from awm_base import flux


def get_config():
    """Return the config."""
    return flux("ocr")
