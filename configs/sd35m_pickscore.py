"""SD3.5-Medium on pickscore: AWM, the public AWM code's defaults.

Every key is documented in configs/awm_base.py.
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    return sd35m("pickscore")
