"""awm_jax.rewards."""
