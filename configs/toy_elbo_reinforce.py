"""Deprecated alias of configs/toy_elbo_exact_reinforce.py.

The exact-weight ELBO objective, renamed (docs/objectives.md).
Loads the same config; kept so that existing commands and workdirs keep working.
"""

from toy_elbo_exact_reinforce import get_config  # noqa: F401
