"""The method table and the compute accounting of ``toy_awm_vs_flow_grpo.py``.

A *method* is a row of :data:`METHODS`: ``name -> (label, config file, config overrides)``; workdirs are
cached per (method, lr, seed). Every base method except the baselines-of-baselines also has a
``<name>_select`` row: the same config with rollout selection (Sol-RL; ``docs/selection.md``) switched on
by :data:`SELECT_OVERRIDES`.
"""

from __future__ import annotations

import os

import _bench_utils as U

# Rollout selection on the toy: Sol-RL's ratios (96 seeds previewed per prompt, 24 kept: 12 best, 12 worst;
# 6-step previews) scaled to the toy's group of 8: 32 seeds, 4 + 4 kept, 6-step deterministic DPM2 previews.
SELECT_OVERRIDES = ("select.enabled=true", "select.num_seeds=32", "select.top_k=4", "select.bottom_k=4",
                    "select.preview_steps=6", "select.preview_sampler=dpm2")
SELECT = "_select"  # suffix of a method's rollout-selection twin

_BASE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # configs/toy.py (the README demo) trains on the strict verdict at lr 3e-3; the comparison: partial, 1e-3
    "awm": ("AWM", "configs/toy.py", ("optim.lr=1e-3", "reward.toy_geneval.strict=false")),
    "flow_grpo": ("Flow-GRPO", "configs/toy_flow_grpo.py", ()),
    "flow_grpo_2step": ("Flow-GRPO, 2 steps/epoch", "configs/toy_flow_grpo.py", ("train.steps_per_epoch=2",)),
    "nft": ("DiffusionNFT (DPM2 rollouts)", "configs/toy_nft.py", ()),
    # the DiffusionNFT rows measured before issue 30 (Euler ODE rollouts standing in for DPM2)
    "nft_ode": ("DiffusionNFT (Euler ODE rollouts, before issue 30)", "configs/toy_nft.py",
                ("sample.sampler=ode",)),
    # seed 004 ("Rethinking the Design Space"): the paper's PEPG and its EPG; RAM (docs/objectives.md)
    "pepg": ("PEPG (seed 004)", "configs/toy_pepg.py", ()),
    "epg": ("EPG (seed 004)", "configs/toy_epg.py", ()),
    "ram": ("RAM", "configs/toy_ram.py", ()),
    # the objectives shipped before issue 30 as "ELBO policy gradients": the exact (1 - t) / t ELBO weight
    "elbo_reinforce": ("ELBO REINFORCE, exact (1-t)/t weight", "configs/toy_elbo_reinforce.py", ()),
    "elbo_grpo": ("ELBO GRPO, exact (1-t)/t weight", "configs/toy_elbo_grpo.py", ()),
}
_NO_SELECT = ("flow_grpo_2step", "nft_ode")

METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    **_BASE,
    **{m + SELECT: (f"{lab} + rollout selection", cfg, (*over, *SELECT_OVERRIDES))
       for m, (lab, cfg, over) in _BASE.items() if m not in _NO_SELECT},
}


def check_config_file(method: str) -> str:
    """The absolute path of ``method``'s config file; a clear error when the method or the file is missing
    (the toy PEPG / EPG / RAM configs come with issue 30's objectives)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} unknown; expected one of {sorted(METHODS)}")
    rel = METHODS[method][1]
    path = os.path.join(U.ROOT, rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"method {method!r} needs the config file {rel}, which this checkout does "
                                "not have (the toy configs of the seed-004 objectives and RAM come with "
                                "issue 30)")
    return path


# ----------------------------------------------------------------------------- compute accounting

SEED004 = ("epg", "pepg", "par", "epg_noratio", "pepg_noratio", "par_noratio", "epg_grpo")
ALGORITHMS = ("awm", "flow_grpo", "nft", "elbo_reinforce", "elbo_grpo", "elbo_exact_reinforce",
              "elbo_exact_grpo", "ram", *SEED004)


def _get(cfg: dict, dotted: str):
    for k in dotted.split("."):
        cfg = cfg[k]
    return cfg


def _x0_passes(algo: str, config: dict) -> int:
    """FPE per (sample, training time) of a clean-sample objective: the trained policy pass (3) plus the
    forward-only passes its loss reads (old policy, reference, kl-EMA adapter)."""
    ref = int(float(_get(config, "awm.beta")) != 0)
    ema = int(float(_get(config, "awm.ema_beta")) != 0)
    if algo == "awm":
        return 3 + ref + ema + int(not bool(_get(config, "awm.on_policy")))
    if algo == "nft":
        return 3 + 1 + ref + ema  # + the old policy's velocity
    if algo in ("elbo_reinforce", "elbo_exact_reinforce"):
        return 3 + ref + ema
    if algo in ("elbo_grpo", "elbo_exact_grpo") or algo in SEED004:
        return 3 + 1 + ref  # the old policy's pass (the kl-EMA adapter) also serves the kl-EMA term
    if algo == "ram":
        return 3 + 1 + 1  # target v_ref + rho A (u - v_old): the reference and the old policy, always
    raise ValueError(f"config algorithm {algo!r}: expected one of {ALGORITHMS}")


def forward_pass_equivalents(config: dict) -> dict[str, int]:
    """Transformer forward-pass equivalents of ONE optimizer step of the run configured by ``config`` (the
    nested dict of a workdir's ``config.json``): ``{"rollout", "train", "total"}`` and, with rollout
    selection, ``"preview"`` (counted in the total); the benchmark's module docstring has the rules."""
    batch = int(_get(config, "data.prompts_per_step")) * int(_get(config, "data.group_size"))
    num_steps = int(_get(config, "sample.num_steps"))
    g = 2 if float(_get(config, "sample.guidance_scale")) != 1.0 else 1
    rollout = batch * num_steps * g
    algo = str(config["algorithm"])
    if algo == "flow_grpo":
        s_train = int(num_steps * float(_get(config, "flow_grpo.timestep_fraction")))
        ref = int(float(_get(config, "flow_grpo.beta")) != 0)
        if g == 1:
            per = 3 + ref
        else:  # [uncond; cond] in one call: a detached uncond half is forward only (1), else fwd + bwd (3)
            detach = bool(_get(config, "flow_grpo").get("cfg_detach_uncond", False))
            per = 3 + (1 if detach else 3) + 2 * ref
        train = batch * s_train * per
    else:
        train = batch * int(_get(config, "awm.train_timesteps")) * _x0_passes(algo, config)
    out = {"rollout": rollout, "train": train}
    sel = config.get("select") or {}
    if sel.get("enabled", False):  # the previews: num_seeds per prompt, preview_steps each
        out["preview"] = (int(_get(config, "data.prompts_per_step")) * int(sel["num_seeds"])
                          * int(sel["preview_steps"]) * g)
    out["total"] = rollout + train + out.get("preview", 0)
    return out
