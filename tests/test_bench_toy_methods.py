"""The method table of benchmarks/toy_awm_vs_flow_grpo.py (issue 30): every row's config loads and validates
with its overrides (or its missing file is a clear error), the FPE of the new objectives and of rollout
selection, and ``--dry-run`` (no training)."""

import importlib.util
import os
import sys

import pytest

from awm_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _module():
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(
            "_bench_toy_methods", os.path.join(BENCH, "toy_awm_vs_flow_grpo.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


B = _module()


def _config_of(method: str):
    """The config a run of ``method`` trains with: its file, then the overrides of its train command."""
    cmd = B.train_command(method, "/w", 0, 2, [])
    c = config_lib.load_config(os.path.join(ROOT, cmd[cmd.index("--config") + 1]))
    over = [a[len("--config."):].split("=", 1) for a in cmd if a.startswith("--config.")]
    config_lib.apply_overrides(c, [tuple(kv) for kv in over])
    config_lib.validate(c)
    return c


def test_every_method_row_loads_or_names_its_missing_config():
    assert {"nft", "pepg", "epg", "ram", "elbo_reinforce", "elbo_grpo", "awm_select", "pepg_select",
            "nft_select"} <= set(B.METHODS)
    assert "exact" in B.LABELS["elbo_reinforce"] and "DPM2" in B.LABELS["nft"]
    assert B.LABELS["awm_select"] == "AWM + rollout selection"
    for m, (_, rel, _) in B.METHODS.items():
        if os.path.isfile(os.path.join(ROOT, rel)):
            c = _config_of(m)
            assert bool(c.select.enabled) == m.endswith(B.SELECT), m
            if m.endswith(B.SELECT):
                assert c.select.top_k + c.select.bottom_k == c.data.group_size
        else:  # e.g. the seed-004 / RAM toy configs before issue 30's objectives are merged
            with pytest.raises(FileNotFoundError, match=rf"method '{m}' needs the config file {rel}"):
                B.train_command(m, "/w", 0, 2, [])
    assert _config_of("nft").sample.sampler == "dpm2"
    assert _config_of("nft_ode").sample.sampler == "ode"


def _fpe_cfg(method: str, **over) -> dict:
    d = _config_of(method).to_dict()
    for k, v in over.items():
        node = d
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return d


def test_fpe_of_the_new_objectives_and_of_selection():
    base = _fpe_cfg("awm")  # 16 x 8 = 128 rollouts, 20 steps, K = 6
    k, b = base["awm"]["train_timesteps"], 128
    assert B.forward_pass_equivalents(base)["rollout"] == b * 20
    seed004 = _fpe_cfg("awm", algorithm="pepg", **{"awm.beta": 1e-4, "awm.ema_beta": 0.0})
    assert B.forward_pass_equivalents(seed004)["train"] == b * k * (3 + 1 + 1)  # + old policy + reference
    ram = _fpe_cfg("awm", algorithm="ram", **{"awm.beta": 0.0, "awm.ema_beta": 0.0})
    assert B.forward_pass_equivalents(ram)["train"] == b * k * (3 + 1 + 1)  # v_old and v_ref in the target
    exact = _fpe_cfg("awm", algorithm="elbo_exact_reinforce")
    assert B.forward_pass_equivalents(exact) == B.forward_pass_equivalents(_fpe_cfg("elbo_reinforce"))
    with pytest.raises(ValueError, match="'nope'"):
        B.forward_pass_equivalents(_fpe_cfg("awm", algorithm="nope"))
    plain, sel = B.forward_pass_equivalents(base), B.forward_pass_equivalents(_fpe_cfg("awm_select"))
    assert "preview" not in plain
    assert sel["preview"] == 16 * 32 * 6  # prompts x seeds x preview steps
    assert sel["rollout"] == plain["rollout"] and sel["train"] == plain["train"]
    assert sel["total"] == plain["total"] + sel["preview"]


def test_dry_run_prints_the_commands_and_trains_nothing(tmp_path, capsys):
    root = str(tmp_path / "runs")
    out = B.main(["--dry-run", "--methods", "awm", "awm_select", "nft", "--lrs", "1e-3", "3e-3",
                  "--seeds", "0", "1", "--root", root])
    cmds = out["commands"]
    assert len(cmds) == 3 * 2 * 2 and not os.path.exists(root)
    sel = [c for c in cmds if "awm_select_lr1e-3_s1" in c[c.index("--workdir") + 1]]
    assert len(sel) == 1 and "--config.select.enabled=true" in sel[0] and "--config.optim.lr=1e-3" in sel[0]
    assert capsys.readouterr().out.count("awm_jax.train") == len(cmds)
    missing = [m for m, (_, rel, _) in B.METHODS.items() if not os.path.isfile(os.path.join(ROOT, rel))]
    if missing:  # a method without its config stops the run before anything trains
        with pytest.raises(SystemExit, match="error: method"):
            B.main(["--dry-run", "--methods", "awm", missing[0], "--root", root])
