"""SD3.5-Medium on ocr: AWM, the paper's settings (Euler-Maruyama, 4 times, uniform w(t), no EMA term).

Every key is documented in configs/awm_base.py.
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    return sd35m("ocr", paper=True)
