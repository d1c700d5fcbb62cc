"""The toy shapes world with AWM: runs end to end on a 2-core CPU in minutes.

    python -m awm_jax.train --config configs/toy.py --workdir runs/toy

Every key is documented in configs/awm_base.py.
"""

from awm_base import toy


def get_config():
    """Return the config."""
    return toy()
