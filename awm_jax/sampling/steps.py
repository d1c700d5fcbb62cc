"""Single sampler steps: Euler ODE, Flow-GRPO SDE (with log-prob), CPS, SA-Solver and DPM2 coefficients.

Conventions: ``x`` (B, C, H, W), ``v`` the velocity at ``(x, t)``, times ``t`` scalars or shape (B,) in
[0, 1] with ``t = 1`` noise.  All arithmetic is float32 (inputs are cast up), log-probs are means over
every non-batch axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _bc(t, x):
    """Broadcast a scalar or (B,) time against ``x`` (B, ...)."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def _mean_nonbatch(a):
    return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def euler_step(x, v, t, t_next):
    """Euler step of the flow ODE: ``x + (t_next - t) v``."""
    x = x.astype(jnp.float32)
    return x + (_bc(t_next, x) - _bc(t, x)) * v.astype(jnp.float32)


def sde_std(t, noise_level, t1):
    """Flow-GRPO diffusion std ``a sqrt(t / (1 - t'))`` with ``t' = t1`` where ``t == 1`` (no sqrt(-dt))."""
    t = jnp.asarray(t, jnp.float32)
    denom = 1.0 - jnp.where(t == 1.0, jnp.asarray(t1, jnp.float32), t)
    return jnp.asarray(noise_level, jnp.float32) * jnp.sqrt(t / denom)


def flow_grpo_sde_mean(x, v, t, t_next, noise_level, t1):
    """Mean and std_t (without sqrt(-dt)) of the Flow-GRPO Euler-Maruyama step."""
    x = x.astype(jnp.float32)
    v = v.astype(jnp.float32)
    std_t = sde_std(t, noise_level, t1)
    tb, sb = _bc(t, x), _bc(std_t, x)
    dt = _bc(t_next, x) - tb
    mean = x * (1.0 + sb**2 * dt / (2.0 * tb)) + v * (1.0 + sb**2 * (1.0 - tb) / (2.0 * tb)) * dt
    return mean, std_t


def gaussian_log_prob(x_next, mean, scale):
    """Mean over C,H,W of the N(mean, scale^2) log-density of ``x_next`` (treated as a constant)."""
    x_next = jax.lax.stop_gradient(x_next.astype(jnp.float32))
    s = _bc(scale, mean)
    lp = -((x_next - mean) ** 2) / (2.0 * s**2) - jnp.log(s) - _LOG_SQRT_2PI
    return _mean_nonbatch(lp)


def flow_grpo_sde_step(x, v, t, t_next, noise, noise_level, t1):
    """Flow-GRPO SDE step ``-> (x_next, log_prob (B,), mean, std_t)``.

    ``x_next = mean + std_t sqrt(t - t_next) noise``; ``std_t = noise_level sqrt(t / (1 - t'))`` where
    ``t' = t1`` (the grid's second point) when ``t == 1``.  ``log_prob`` is float32, averaged over C,H,W.
    """
    mean, std_t = flow_grpo_sde_mean(x, v, t, t_next, noise_level, t1)
    scale = std_t * jnp.sqrt(jnp.asarray(t, jnp.float32) - jnp.asarray(t_next, jnp.float32))
    x_next = mean + _bc(scale, mean) * noise.astype(jnp.float32)
    return x_next, gaussian_log_prob(x_next, mean, scale), mean, std_t


def flow_grpo_sde_log_prob(x, v, t, t_next, x_next, noise_level, t1):
    """Recompute the SDE step log-prob of a stored ``x_next`` ``-> (log_prob (B,), mean, std_t)``."""
    mean, std_t = flow_grpo_sde_mean(x, v, t, t_next, noise_level, t1)
    scale = std_t * jnp.sqrt(jnp.asarray(t, jnp.float32) - jnp.asarray(t_next, jnp.float32))
    return gaussian_log_prob(x_next, mean, scale), mean, std_t


def cps_mean(x, v, t, t_next, noise_level):
    """Coefficient-preserving (CPS) step mean and std ``t_next sin(a pi / 2)``."""
    x = x.astype(jnp.float32)
    v = v.astype(jnp.float32)
    tb, tn = _bc(t, x), _bc(t_next, x)
    std = jnp.asarray(t_next, jnp.float32) * jnp.sin(jnp.asarray(noise_level, jnp.float32) * jnp.pi / 2)
    sb = _bc(std, x)
    x0_hat = x - tb * v
    x1_hat = x + (1.0 - tb) * v
    mean = (1.0 - tn) * x0_hat + jnp.sqrt(jnp.maximum(tn**2 - sb**2, 0.0)) * x1_hat
    return mean, std


def cps_step(x, v, t, t_next, noise, noise_level):
    """CPS step ``-> (x_next, log_prob, mean, std)`` with ``log_prob = -mean_CHW (x_next - mean)^2``."""
    mean, std = cps_mean(x, v, t, t_next, noise_level)
    x_next = mean + _bc(std, mean) * noise.astype(jnp.float32)
    return x_next, cps_log_prob_from_mean(x_next, mean), mean, std


def cps_log_prob_from_mean(x_next, mean):
    """The CPS surrogate log-prob ``-mean_CHW (x_next - mean)^2`` (x_next treated as a constant)."""
    return -_mean_nonbatch((jax.lax.stop_gradient(x_next.astype(jnp.float32)) - mean) ** 2)


def cps_log_prob(x, v, t, t_next, x_next, noise_level):
    """Recompute the CPS log-prob of a stored ``x_next`` ``-> (log_prob, mean, std)``."""
    mean, std = cps_mean(x, v, t, t_next, noise_level)
    return cps_log_prob_from_mean(x_next, mean), mean, std


# ----------------------------------------------------------------------------------------------
# SA-Solver (stochastic Adams, data prediction) -- coefficients on the host in float64.
#
# With alpha = 1 - t, sigma = t, lambda = log(alpha / sigma) and data prediction D = x - t v, one
# step from t_p to t (h = lambda_t - lambda_p > 0, c = 1 + tau^2) is
#   x_t = e^{-tau^2 h} (sigma_t / sigma_p) x_p + sum_i w_i D_i + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,
#   w_i = c alpha_t int_{-h}^{0} e^{c u} l_i(lambda_t + u) du,
# l_i the Lagrange basis on the lambdas of the D_i used (Xue et al. 2023, eqs. 15/18).  Order-2 steps
# carry the few-step O(h^3) correction used by the public AWM sampler.
# ----------------------------------------------------------------------------------------------


def _lam(t):
    return math.log((1.0 - t) / t)


def _exp_moments(h: float, c: float, kmax: int) -> list[float]:
    """``M_k = int_{-h}^0 e^{c u} u^k du`` for k = 0..kmax (integration by parts recursion)."""
    m = [-math.expm1(-c * h) / c]
    for k in range(1, kmax + 1):
        m.append(-((-h) ** k) * math.exp(-c * h) / c - k / c * m[k - 1])
    return m


def _weights(lam_t: float, lam_nodes: list[float], h: float, tau: float) -> list[float]:
    """``w_i`` for the nodes ``lam_nodes`` (newest first), before the few-step correction."""
    c = 1.0 + tau * tau
    alpha_t = 1.0 / (1.0 + math.exp(-lam_t))
    u_nodes = [ln - lam_t for ln in lam_nodes]
    mom = _exp_moments(h, c, len(u_nodes))
    out = []
    for i, ui in enumerate(u_nodes):
        poly = np.poly1d([1.0])
        for j, uj in enumerate(u_nodes):
            if j != i:
                poly = poly * np.poly1d([1.0, -uj]) / (ui - uj)
        coeffs = poly.coeffs[::-1]  # ascending powers of u
        out.append(c * alpha_t * sum(float(a) * mom[k] for k, a in enumerate(coeffs)))
    return out


def _few_step_correction(h: float, tau: float, alpha_t: float, predictor: bool, lam_gap: float) -> float:
    c = 1.0 + tau * tau
    exact = (c * h - 1.0 + math.exp(-c * h)) / (c * c)  # int_{-h}^0 e^{cu} (u + h) du
    if predictor:
        return c * alpha_t * (h * h / 2.0 - exact) / lam_gap
    return c * alpha_t * (h / 2.0 - exact / h)


def sa_solver_tau(t: float, noise_level: float, t_window=(0.3, 0.9)) -> float:
    """Stochasticity ``tau(t) = noise_level`` for ``t_min <= t <= t_max``, else 0."""
    return float(noise_level) if t_window[0] <= t <= t_window[1] else 0.0


def sa_solver_coefficients(grid, noise_level: float, t_window=(0.3, 0.9)) -> dict[str, np.ndarray]:
    """Per-step coefficients of the order-2/2 PEC SA-Solver for steps ``1 .. N - 1`` of ``grid``.

    Returns float32 arrays of length ``N - 1``: ``t`` (target time), ``x_scale``, ``noise_scale``,
    predictor weights ``p0`` (newest D) / ``p1``, corrector weights ``c0`` (D at the new point) / ``c1``
    (D at the previous point) and ``use_corrector`` (0 at the first step).  Step ``N`` (to t = 0) is not
    integrated: the sampler returns the last data prediction.
    """
    g = np.asarray(grid, np.float64)
    n = g.shape[0] - 1
    if n < 2 or g[-1] != 0.0 or not np.all(np.diff(g) < 0) or g[0] >= 1.0:
        raise ValueError(f"SA-Solver grid must decrease from t[0] < 1 to t[N] = 0 with N >= 2, got {g}")
    rows = {k: [] for k in ("t", "x_scale", "noise_scale", "p0", "p1", "c0", "c1", "use_corrector")}
    for step in range(1, n):
        t, tp = g[step], g[step - 1]
        tau = sa_solver_tau(t, noise_level, t_window)
        lam_t, lam_p = _lam(t), _lam(tp)
        h = lam_t - lam_p
        alpha_t = 1.0 - t
        if step == 1:  # first step: order-1 predictor, corrector off
            p = _weights(lam_t, [lam_p], h, tau) + [0.0]
            cw, use_c = [0.0, 0.0], 0.0
        else:
            lam_pp = _lam(g[step - 2])
            p = _weights(lam_t, [lam_p, lam_pp], h, tau)
            corr = _few_step_correction(h, tau, alpha_t, True, lam_p - lam_pp)
            p = [p[0] + corr, p[1] - corr]
            cw = _weights(lam_t, [lam_t, lam_p], h, tau)
            corr = _few_step_correction(h, tau, alpha_t, False, 0.0)
            cw, use_c = [cw[0] + corr, cw[1] - corr], 1.0
        rows["t"].append(t)
        rows["x_scale"].append(math.exp(-tau * tau * h) * t / tp)
        rows["noise_scale"].append(t * math.sqrt(-math.expm1(-2.0 * tau * tau * h)))
        rows["p0"].append(p[0])
        rows["p1"].append(p[1])
        rows["c0"].append(cw[0])
        rows["c1"].append(cw[1])
        rows["use_corrector"].append(use_c)
    return {k: np.asarray(v, np.float32) for k, v in rows.items()}


def data_prediction(x, v, t):
    """``x0_hat = x - t v`` (float32)."""
    x = x.astype(jnp.float32)
    return x - _bc(t, x) * v.astype(jnp.float32)


def sa_solver_step(x, d_prev, d_prev2, coeffs, noise, d_fn):
    """One PEC step of SA-Solver: predict, evaluate ``d_fn(x_p)`` at the new time, correct.

    ``coeffs`` holds the scalars of one row of :func:`sa_solver_coefficients`; returns
    ``(x_new, d_new)`` with ``d_new`` the data prediction at the predicted point.
    """
    noise = noise.astype(jnp.float32)
    base = coeffs["x_scale"] * x + coeffs["noise_scale"] * noise
    x_p = base + coeffs["p0"] * d_prev + coeffs["p1"] * d_prev2
    d_new = d_fn(x_p)
    x_c = base + coeffs["c0"] * d_new + coeffs["c1"] * d_prev
    return jnp.where(coeffs["use_corrector"] > 0, x_c, x_p), d_new


# ----------------------------------------------------------------------------------------------
# DPM2: the deterministic multistep DPM-Solver++(2M) rollout solver of DiffusionNFT (NVlabs/DiffusionNFT
# flow_grpo/diffusers_patch/solver.py at 24af5554, dpm_step lines 207-260; docs/samplers.md).  With
# alpha = 1 - sigma, lambda = log(alpha / sigma) and the data prediction D_i = x_i - sigma_i v(x_i, sigma_i):
#   step 0 and the last step: the DDIM (eta = 0) update  x' = (s'/s) x + ((1 - s') - s' (1 - s) / s) D
#     (solver.py:229-237, ddim_update 275-295; at s' = 0 it is x' = D, at s = 1 x' = (1 - s') D + s' x);
#   steps 1 .. N - 2: x' = (s'/s) x - alpha' (e^{-h} - 1) [D_i + (D_i - D_{i-1}) / (2 r0)],
#     h = lambda' - lambda_i, r0 = (lambda_i - lambda_{i-1}) / h (multistep_dpm_solver_second_order_update,
#     317-350); lambda_{i-1} = -inf (sigma = 1) makes r0 infinite and the correction 0.
# ----------------------------------------------------------------------------------------------


def dpm2_coefficients(grid) -> dict[str, np.ndarray]:
    """Per-step coefficients of the DPM2 solver on ``grid`` (N + 1 points, ``grid[0] <= 1``), computed in
    float64 from the grid rounded to float32 (the authors' sigmas are the scheduler's float32 sigmas upcast
    to float64, solver.py:233, pipeline_with_logprob.py:207) and returned as float32 arrays of length N:
    ``x_scale``, ``d_scale``, ``diff_scale`` with ``x_{i+1} = x_scale x_i + d_scale D_i + diff_scale
    (D_i - D_{i-1})``, and ``t`` (the time of step i's model call)."""
    g = np.asarray(grid, np.float64).astype(np.float32).astype(np.float64)
    n = g.shape[0] - 1
    if g.ndim != 1 or n < 1 or not np.all(np.diff(g) < 0) or g[0] > 1.0 or g[-1] < 0.0:
        raise ValueError(f"DPM2 grid must be strictly decreasing within [0, 1], got {g}")

    def lam(s):
        return -math.inf if s >= 1.0 else (math.inf if s <= 0.0 else math.log((1.0 - s) / s))

    rows = {k: [] for k in ("t", "x_scale", "d_scale", "diff_scale")}
    for i in range(n):
        s, s_next = g[i], g[i + 1]
        if i == 0 or i == n - 1:  # DDIM, eta = 0 (first step: no history; last: lower_order_final)
            a, b, c = s_next / s, (1.0 - s_next) - s_next * (1.0 - s) / s, 0.0
        else:
            h = lam(s_next) - lam(s)
            a = s_next / s
            b = -(1.0 - s_next) * math.expm1(-h)
            h0 = lam(s) - lam(g[i - 1])
            c = 0.0 if math.isinf(h0) else 0.5 * b * h / h0  # (D_i - D_{i-1}) / (2 r0), r0 = h0 / h
        rows["t"].append(s)
        rows["x_scale"].append(a)
        rows["d_scale"].append(b)
        rows["diff_scale"].append(c)
    return {k: np.asarray(v, np.float32) for k, v in rows.items()}


def dpm2_step(x, d, d_prev, coeffs):
    """One DPM2 step ``x_scale x + d_scale d + diff_scale (d - d_prev)`` (``coeffs``: one row of
    :func:`dpm2_coefficients`), float32."""
    x, d, d_prev = x.astype(jnp.float32), d.astype(jnp.float32), d_prev.astype(jnp.float32)
    return coeffs["x_scale"] * x + coeffs["d_scale"] * d + coeffs["diff_scale"] * (d - d_prev)
