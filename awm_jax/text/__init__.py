"""awm_jax.text."""
