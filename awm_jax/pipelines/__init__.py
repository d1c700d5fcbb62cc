"""awm_jax.pipelines: full text-to-image pipelines (text encoders + Flax transformer + Flax VAE)."""

from awm_jax.pipelines.flux import FluxT2IPipeline, load_flux, load_flux_pipeline
from awm_jax.pipelines.sd3 import SD3Pipeline, load_sd3, load_sd3_pipeline
from awm_jax.pipelines.zimage import ZImageT2IPipeline, load_zimage, load_zimage_pipeline

__all__ = ["FluxT2IPipeline", "SD3Pipeline", "ZImageT2IPipeline", "load_flux", "load_flux_pipeline",
           "load_sd3", "load_sd3_pipeline", "load_zimage", "load_zimage_pipeline"]
