"""awm_jax.convert."""
