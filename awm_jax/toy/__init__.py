"""awm_jax.toy."""
