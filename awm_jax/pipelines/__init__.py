"""awm_jax.pipelines: full text-to-image pipelines (text encoders + Flax transformer + Flax VAE)."""

from awm_jax.pipelines.sd3 import SD3Pipeline, load_sd3, load_sd3_pipeline

__all__ = ["SD3Pipeline", "load_sd3", "load_sd3_pipeline"]
