"""awm-jax: Advantage Weighted Matching RL post-training for flow-matching models in JAX/Flax."""

import flax as _flax

# Parameters carry *logical* axis names as metadata (see awm_jax/parallel.py). Sharding is applied
# explicitly from one rule table, never eagerly at variable creation (which would need a mesh).
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
