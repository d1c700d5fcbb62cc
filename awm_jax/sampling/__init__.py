"""awm_jax.sampling."""
