"""Deprecated alias of configs/sd35m_geneval_elbo_exact_grpo.py.

The exact-weight ELBO objective, renamed (docs/objectives.md).
Loads the same config; kept so that existing commands and workdirs keep working.
"""

from sd35m_geneval_elbo_exact_grpo import get_config  # noqa: F401
