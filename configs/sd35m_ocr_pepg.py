"""SD3.5-Medium on ocr: PEPG, the ELBO policy gradient of "Rethinking the Design Space of RL for
Diffusion Models" (seed 004), as scripts/sd3/sd3_geneval_pepg.sh runs it with config/sd3.py:sd3_ocr
(github jaemoo-choi/rethinking-diffusion-rl at c2570002365231487b1392c7aef3a13a069edf79).

No sd3_ocr_pepg.sh exists at that commit: this is sd3_geneval_pepg.sh's environment (every value below) with
the config function config/sd3.py:sd3_ocr (dataset ocr, reward {"ocr": 1.0}, prompt_fn "text").

Keys that differ from the AWM config (set in configs/awm_base.py _seed004, each commented there with its
script line; docs/objectives.md has the file:line of every value and the deviations):

- algorithm = "pepg" (METHOD, sd3_geneval_pepg.sh:35): loss -mean r (A - lr) E per (time, sample)
- elbo.likelihood = "adaptive" (ELBO, :41)
- advantages.mode = "exact", advantages.exact_scale = 0.1 (ADV :36, BETA / ALPHA :38-39): A = 0.1 (R - mean)
- awm.beta = 1e-4, awm.ema_beta = 0 (KL_METHOD girsanov :37, BETA :38)
- ema.kl_decay_rate = 0.001, ema.kl_decay_max = 0.5 (DECAY_TYPE=1 :42): the old policy samples the rollouts
- optim.max_grad_norm = 5.0 (:43); train.steps_per_epoch = 1 (:44); no CFG (:45-47); lr 3e-4 (:48, default)
- awm.timestep_sampler = "permutation", awm.timestep_fraction = 0.99 (config/base.py:132),
  awm.train_timesteps = 9
- sample.sampler = "dpm2", sample.num_steps = 10, sample.noise_level = 0 (config/sd3.py:26, 52-53)
- data.prompts_per_step = 48 (x 24 images, config/sd3.py:31, 14); max_steps = 360 (MAX_EPOCHS, :34)
- ema.eval_decay_max = 0.9 (src/train.py EMAModuleWrapper(decay=0.9))
"""

from awm_base import sd35m


def get_config():
    """Return the config."""
    return sd35m("ocr", algorithm="pepg")
