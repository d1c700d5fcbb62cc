"""Config builders of the model families added after SD3.5 and FLUX.1: Z-Image and Qwen-Image.

Each is the SD3.5-M task config (``awm_base.sd35m``) with the family's keys changed; every key is declared and
documented in ``configs/awm_base.py``. Kept apart from ``awm_base`` so that file stays one screenful per
concern; the shipped ``configs/zimage_*.py`` and ``configs/qwenimage_*.py`` import from here.
"""

import ml_collections
from awm_base import sd35m


def zimage(task: str, algorithm: str = "awm") -> ml_collections.ConfigDict:
    """Z-Image (6B) config for ``task`` in {geneval, ocr, pickscore}: the SD3.5-M task config with these keys
    changed. Neither the AWM authors nor Flow-GRPO publish Z-Image settings; the ones below follow
    Flow-Factory's Z-Image GRPO LoRA example (examples/grpo/lora/z_image/default.yaml: base
    Tongyi-MAI/Z-Image, LoRA r 64 / alpha 128 on its default targets, 10 rollout steps, Flow-SDE noise 0.7,
    CFG 4, 40 eval steps) where it has them."""
    c = sd35m(task, algorithm)
    c.model.kind = "zimage"  # the Z-Image family (awm_jax.models.zimage)
    c.model.arch = "z-image-turbo"  # 30 + 2 + 2 blocks, 3840 wide (Z-Image and Z-Image-Turbo share it)
    c.model.path = "weights/z-image"  # diffusers ZImagePipeline folder (transformer/ may be converted)
    c.model.vae_path = ""  # "" = <path>/vae (FLUX's AutoencoderKL, scaling 0.3611 / shift 0.1159)
    c.model.text_encoder_paths = ("",)  # Qwen3: read from the pipeline folder
    # caption tokens (chat-templated prompt): ZImagePipeline's default is 512; 128 covers the task prompts
    # (the trainer warns on truncation) with a quarter of the padded caption stream
    c.model.max_sequence_length = 128
    c.lora.rank = 64  # Flow-Factory's Z-Image LoRA: r 64, alpha 128
    c.lora.alpha = 128.0
    c.lora.targets = ()  # the family's default = Flow-Factory's: attention q/k/v/out + feed_forward w1/w2/w3
    # CFG in the trainer's standard form v_u + s (v_c - v_u): ZImagePipeline's guidance_scale g is s - 1,
    # so s = 5 is Flow-Factory's (and ZImagePipeline's default-ish) g = 4 (Z-Image-Turbo: g = 0, s = 1)
    c.sample.guidance_scale = 5.0
    c.eval.guidance_scale = 5.0
    c.sample.shift = 3.0  # static scheduler shift (Z-Image-Turbo's scheduler_config); 0 = dynamic shift
    c.eval.num_steps = 40  # Flow-Factory's Z-Image eval steps (ZImagePipeline's default: 50)
    if algorithm == "flow_grpo":
        c.sample.num_steps = 10  # Flow-Factory z_image: 10 rollout steps, Flow-SDE noise level 0.7
        c.sample.noise_level = 0.7
        c.flow_grpo.beta = 0.0  # Flow-Factory z_image: kl_beta 0
    return c


def qwenimage(task: str, algorithm: str = "awm") -> ml_collections.ConfigDict:
    """Qwen-Image (20B) config for ``task`` in {geneval, ocr, pickscore}: the SD3.5-M task config with these
    keys changed. The AWM authors publish no Qwen-Image settings; the ones below follow Flow-GRPO's Qwen-Image
    configs (config/grpo.py ``pickscore_qwenimage``: 10 rollout steps, 50 eval steps, CFG 4, 512 px,
    beta 0, SDE noise level 1.2) and verl's Flow-GRPO Qwen-Image recipe for the LoRA (r 64, alpha 128,
    attention + MLP projections of both streams)."""
    c = sd35m(task, algorithm)
    c.model.kind = "qwenimage"  # the Qwen-Image family (awm_jax.models.qwenimage)
    c.model.arch = "qwen-image"  # 60 double-stream blocks, 3072 wide, MSRoPE
    c.model.path = "weights/qwen-image"  # diffusers QwenImagePipeline folder (transformer/ may be converted)
    c.model.vae_path = ""  # "" = <path>/vae (AutoencoderKLQwenImage, latents mean/std normalisation)
    c.model.text_encoder_paths = ("",)  # Qwen2.5-VL: read from the pipeline folder
    # text tokens after the dropped system turn: QwenImagePipeline's default is 512; 128 covers the task
    # prompts (the trainer warns on truncation) at a quarter of the padded text stream
    c.model.max_sequence_length = 128
    c.model.resolution = 512  # Flow-GRPO's Qwen-Image resolution
    c.lora.rank = 64  # verl Flow-GRPO Qwen-Image: lora_rank 64, lora_alpha 128
    c.lora.alpha = 128.0
    c.lora.targets = ()  # the family's default: attention q/k/v/out of both streams + img/txt MLPs
    # CFG 4 (Flow-GRPO's guidance_scale); the trainer applies standard CFG, not QwenImagePipeline's
    # norm-rescaled true CFG (awm_jax.pipelines.qwenimage samples with that one)
    c.sample.guidance_scale = 4.0
    c.eval.guidance_scale = 4.0
    c.sample.shift = 0.0  # 0 = Qwen-Image's dynamic exponential shift (+ shift_terminal 0.02)
    c.eval.num_steps = 50  # Flow-GRPO's eval_num_steps for Qwen-Image (QwenImagePipeline's default)
    if algorithm == "flow_grpo":
        c.sample.num_steps = 10  # Flow-GRPO pickscore_qwenimage: 10 rollout steps
        c.sample.noise_level = 1.2  # its SDE noise level (SD3.5: 0.7)
        c.flow_grpo.beta = 0.0  # train.beta = 0
    return c
