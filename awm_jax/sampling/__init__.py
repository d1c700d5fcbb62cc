"""awm_jax.sampling: model-agnostic flow-matching samplers (t = 1 is noise, ``x_t = (1 - t) x0 + t eps``).

Grids (host numpy): :func:`shifted_grid` (diffusers ``FlowMatchEulerDiscreteScheduler`` shift grid),
:func:`flux_grid` / :func:`calculate_shift` (FLUX dynamic shift), :func:`awm_sa_solver_grid` (AWM tweaks).
Steps: :func:`euler_step`, :func:`flow_grpo_sde_step` / :func:`flow_grpo_sde_log_prob`, :func:`cps_step` /
:func:`cps_log_prob`, :func:`sa_solver_coefficients`, :func:`dpm2_coefficients` / :func:`dpm2_step`.
Samplers (jitted ``lax.scan``): :func:`sample_ode`, :func:`sample_sde`, :func:`sample_cps`,
:func:`sample_sa_solver`, :func:`sample_dpm2`, :func:`sample` (the one dispatch by sampler name);
:func:`classifier_free_guidance` wraps a conditional model into a velocity_fn.
"""

from awm_jax.deprecation import aliases as _deprecated_aliases
from awm_jax.sampling.samplers import (
    SAMPLERS,
    classifier_free_guidance,
    init_latents,
    sample,
    sample_cps,
    sample_dpm2,
    sample_ode,
    sample_sa_solver,
    sample_sde,
)
from awm_jax.sampling.schedules import (
    awm_sa_solver_grid,
    calculate_shift,
    check_grid,
    dynamic_shift_times,
    flux_grid,
    flux_image_seq_len,
    shift_times,
    shifted_grid,
)
from awm_jax.sampling.steps import (
    cps_log_prob,
    cps_step,
    data_prediction,
    dpm2_coefficients,
    dpm2_step,
    euler_step,
    flow_grpo_sde_log_prob,
    flow_grpo_sde_mean,
    flow_grpo_sde_step,
    sa_solver_coefficients,
    sde_std,
)

__all__ = [
    "awm_sa_solver_grid", "calculate_shift", "check_grid", "classifier_free_guidance", "cps_log_prob",
    "cps_step", "data_prediction", "dpm2_coefficients", "dpm2_step", "dynamic_shift_times", "euler_step",
    "flow_grpo_sde_log_prob",
    "flow_grpo_sde_mean", "flow_grpo_sde_step", "flux_grid", "flux_image_seq_len", "init_latents",
    "SAMPLERS", "sa_solver_coefficients", "sample_cps", "sample", "sample_dpm2", "sample_ode",
    "sample_sa_solver",
    "sample_sde", "shifted_grid",
    "sde_std", "shift_times",
]


# deprecated aliases of names that moved (awm_jax/deprecation.py, CHANGELOG.md)
__getattr__ = _deprecated_aliases(__name__)
