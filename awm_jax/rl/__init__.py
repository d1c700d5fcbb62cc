"""awm_jax.rl."""
