"""awm_jax.models."""
