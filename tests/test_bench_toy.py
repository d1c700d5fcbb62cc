"""benchmarks/toy_awm_vs_flow_grpo.py: FPE accounting and the analysis on synthetic workdirs (no training)."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, os.path.join(ROOT, "configs"))
from awm_base import toy  # noqa: E402


def _module():
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(
            "_bench_toy_awm_vs_flow_grpo", os.path.join(BENCH, "toy_awm_vs_flow_grpo.py")
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


B = _module()


def _cfg(algo, **over):
    """The toy config as a workdir's config.json, at the recorded comparison's settings (10 rollout steps,
    K = 4: ``--set sample.num_steps=10 --set awm.train_timesteps=4``) unless overridden."""
    c = toy(algo)
    over = {"sample.num_steps": 10, "awm.train_timesteps": 4, **over}
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return json.loads(json.dumps(c.to_dict(), default=str))  # as a workdir's config.json


# ----------------------------------------------------------------------------- FPE accounting


def test_fpe_toy_awm_by_hand():
    # batch 16 x 8 = 128; rollout 128 x 10 ODE steps; train 128 x K=4 x (3 policy + 1 ref (beta 1e-3)
    # + 1 kl-EMA (ema_beta 1.0)); on-policy: no logp_old pass
    assert B.forward_pass_equivalents(_cfg("awm")) == {"rollout": 1280, "train": 2560, "total": 3840}


def test_fpe_shipped_toy_awm_by_hand():
    # the shipped configs/toy.py: rollout 128 x 20 ODE steps; train 128 x K=6 x (3 + 1 ref + 1 kl-EMA)
    c = json.loads(json.dumps(toy("awm").to_dict(), default=str))
    assert B.forward_pass_equivalents(c) == {"rollout": 2560, "train": 3840, "total": 6400}


def test_fpe_toy_flow_grpo_by_hand():
    # rollout 128 x 10 SDE steps (no CFG in the toy); train 128 x int(10 x 0.99) = 9 steps x (3 + 1 ref)
    assert B.forward_pass_equivalents(_cfg("flow_grpo")) == {"rollout": 1280, "train": 4608, "total": 5888}


def test_fpe_follows_the_code_paths():
    no_kl = _cfg("awm", **{"awm.beta": 0.0, "awm.ema_beta": 0.0})
    assert B.forward_pass_equivalents(no_kl)["train"] == 128 * 4 * 3
    off = _cfg("awm", **{"awm.on_policy": False})
    assert B.forward_pass_equivalents(off)["train"] == 128 * 4 * 6  # + logp_old with the kl-EMA adapter
    g = _cfg(
        "flow_grpo", **{"sample.guidance_scale": 4.5, "flow_grpo.beta": 0}
    )
    # CFG with the unconditional half detached (the default): cond fwd + bwd (3) + uncond forward (1)
    assert B.forward_pass_equivalents(g) == {"rollout": 2560, "train": 128 * 9 * 4, "total": 2560 + 4608}
    g["flow_grpo"]["cfg_detach_uncond"] = False  # both halves differentiated: 2 x 3
    assert B.forward_pass_equivalents(g)["train"] == 128 * 9 * 3 * 2
    two = _cfg("flow_grpo", **{"train.steps_per_epoch": 2})  # same rollouts, same passes, in 2 steps
    assert B.forward_pass_equivalents(two) == B.forward_pass_equivalents(_cfg("flow_grpo"))


# ----------------------------------------------------------------------------- synthetic workdirs


def _write(path, recs):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def _fake_run(root, algo, seed, acc, sps, steps=4):
    """A workdir with ``steps`` metrics records (``sps`` samples/s) and evals at steps 0, 2, 4 (``acc``)."""
    wd = B.workdir_of(str(root), algo, seed)
    os.makedirs(wd)
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(_cfg(algo, seed=seed, max_steps=steps), f)
    _write(
        os.path.join(wd, "metrics.jsonl"),
        [
            {"step": s, "reward_mean": 0.1 * s + seed, "samples_per_s": sps, "wall_s": 10.0 * s,
             "kl": 1e-3 * s, "lora_norm": 1.0 + s, "lora_b_norm": 0.1 * s + seed, "adv_abs_mean": 0.5,
             "adv_zero_frac": 0.05 * s, "zero_std_frac": 0.0, "loss": 0.01 * s}
            for s in range(1, steps + 1)
        ],
    )
    _write(
        os.path.join(wd, "eval.jsonl"),
        [
            {
                "step": s,
                "accuracy": a,
                "accuracy/overall": a,
                "accuracy/counting": a / 2,
                "accuracy/colors": 1.0,
            }
            for s, a in zip((0, 2, 4), acc)
        ],
    )
    return wd


def _curves(tmp_path, awm_acc, grpo_acc):
    for seed, d in ((0, -0.05), (1, 0.05)):  # seed spread +-0.05: the means are the given values
        _fake_run(tmp_path, "awm", seed, [a + d for a in awm_acc], sps=128.0)  # 1 s per step
        _fake_run(tmp_path, "flow_grpo", seed, [a + d for a in grpo_acc], sps=64.0)  # 2 s per step
    return B.load_curves(str(tmp_path), [0, 1])


def test_run_curves_fpe_and_wall(tmp_path):
    c = _curves(tmp_path, [0.2, 0.3, 0.4], [0.2, 0.25, 0.3])
    a, g = c["awm"][0], c["flow_grpo"][1]
    assert a["cum_fpe"] == [3840, 7680, 11520, 15360] and a["train_wall_s"] == pytest.approx([1, 2, 3, 4])
    assert g["eval"]["cum_fpe"] == [0, 11776, 23552] and g["eval"]["train_wall_s"] == pytest.approx([0, 4, 8])
    assert g["eval"]["per_tag"][0] == {"counting": pytest.approx(0.125), "colors": 1.0}


def test_headline_speedup_and_outputs(tmp_path):
    c = _curves(tmp_path, [0.2, 0.35, 0.4], [0.2, 0.25, 0.3])
    res = B.write_outputs(str(tmp_path / "out"), c, "python benchmarks/toy_awm_vs_flow_grpo.py --x")
    h = res["headline"]
    assert h["a_star"] == pytest.approx(0.3) and h["reached"]
    assert h["flow_grpo"]["step"] == 4 and h["awm"]["step"] == 2  # first eval point >= A*, no interpolation
    assert h["speedup_fpe"] == pytest.approx(23552 / 7680) and h["speedup_wall"] == pytest.approx(8 / 2)
    fin = res["final"]["awm"]
    assert fin["overall"]["mean"] == pytest.approx(0.4) and fin["steps"] == [4]
    assert fin["overall"]["std"] == pytest.approx(0.0707107, rel=1e-4)  # sample std of 0.35, 0.45
    band = res["accuracy"]["awm"]
    assert band["lo"][1] == pytest.approx(0.30) and band["hi"][1] == pytest.approx(0.40)
    for p in res["paths"]["png"] + [res["paths"]["md"], res["paths"]["jsonl"]]:
        assert os.path.getsize(p) > 0
    assert [os.path.basename(p) for p in res["paths"]["png"]] == [
        "toy_awm_vs_flow_grpo_accuracy.png",
        "toy_awm_vs_flow_grpo_reward.png",
        "toy_awm_vs_flow_grpo_drift.png",
    ]
    md = open(res["paths"]["md"]).read()
    assert "3.07x" in md and "4.00x" in md and "counting" in md and "--x" in md
    lines = [json.loads(x) for x in open(res["paths"]["jsonl"])]
    assert [x["kind"] for x in lines] == ["run"] * 4 + ["summary"]


def test_not_reached(tmp_path):
    c = _curves(tmp_path, [0.2, 0.1, 0.15], [0.2, 0.25, 0.3])
    res = B.write_outputs(str(tmp_path / "out"), c, "cmd")
    h = res["headline"]
    assert not h["reached"] and h["awm"] is None and h["speedup_fpe"] is None
    assert "not reached" in open(res["paths"]["md"]).read()


def test_base_model_is_best_speedup_undefined(tmp_path):
    res = B.analyze(_curves(tmp_path, [0.2, 0.3, 0.4], [0.2, 0.1, 0.15]))
    h = res["headline"]
    assert h["flow_grpo"]["step"] == 0 and h["awm"]["step"] == 0 and h["speedup_fpe"] is None
    assert "undefined" in h["note"]


def test_first_reach_and_speedup_units():
    agg = {"step": [0, 5, 10], "fpe": [0.0, 5.0, 10.0], "wall": [0.0, 1.0, 2.0], "mean": [0.1, 0.29, 0.31]}
    assert B.first_reach(agg, 0.3)["step"] == 10
    assert B.first_reach(agg, 0.29)["step"] == 5  # "at or above"
    assert B.first_reach(agg, 0.5) is None
    assert B.speedup(10.0, 5.0) == 2.0 and B.speedup(10.0, 0.0) is None


# ----------------------------------------------------------------------------- running


def test_train_command_and_failure_names_run_and_log(tmp_path):
    cmd = B.train_command("flow_grpo", "/w", 3, 7, ["eval.every=1"])
    assert cmd[-4:] == ["/w", "--config.seed=3", "--config.max_steps=7", "--config.eval.every=1"]
    assert "configs/toy_flow_grpo.py" in cmd
    wd = str(tmp_path / "awm_s0")
    bad = {"name": "awm_s0", "workdir": wd, "cmd": [sys.executable, "-c", "import sys; sys.exit(3)"]}
    with pytest.raises(RuntimeError, match=r"awm_s0 failed with exit code 3.*awm_s0\.log"):
        B.run_all([bad], jobs=1)
    assert os.path.isfile(wd + ".log")


def test_methods_lr_workdirs_cached_and_best_lr(tmp_path):
    assert set(B.METHODS) >= {"awm", "flow_grpo", "flow_grpo_2step"}
    cmd = B.train_command("flow_grpo_2step", "/w", 0, 2, ["eval.every=1"], lr="1e-3")
    assert cmd[-3:] == ["--config.train.steps_per_epoch=2", "--config.optim.lr=1e-3", "--config.eval.every=1"]
    with pytest.raises(ValueError, match="unknown"):
        B.train_command("nope", "/w", 0, 2, [])
    assert B.workdir_of("r", "awm", 1, "3e-4").endswith(os.path.join("r", "awm_lr3e-4_s1"))
    for lr, acc in (("1e-3", [0.2, 0.3, 0.25]), ("3e-3", [0.2, 0.4, 0.1])):
        wd = B.workdir_of(str(tmp_path), "awm", 0, lr)
        os.makedirs(os.path.dirname(wd), exist_ok=True)
        os.rename(_fake_run(tmp_path / lr, "awm", 0, acc, sps=128.0), wd)
        assert B.is_done(wd)
    assert not B.is_done(str(tmp_path / "missing"))
    c = B.load_curves(str(tmp_path), [0], ["awm"], ["1e-3", "3e-3"])
    assert list(c) == ["awm@1e-3", "awm@3e-3"] and B.best_lrs(c, ["awm"], ["1e-3", "3e-3"]) == {"awm": "3e-3"}


def test_stability_drift_and_sweep_tables(tmp_path):
    """Peak / final / drop of the seed-mean curve, drift rows (seed means at eval steps), the sweep rows and
    the per-method table in the report, re-derived by hand from the fake runs."""
    c = _curves(tmp_path, [0.2, 0.4, 0.3], [0.2, 0.25, 0.3])
    st = B.stability(B.aggregate([B.accuracy_points(x) for x in c["awm"]]))
    assert (st["peak_step"], st["final_step"]) == (2, 4)
    assert (st["peak"], st["final"], st["drop"]) == pytest.approx((0.4, 0.3, 0.1))
    d = B.drift_table(c["awm"])
    assert [r["step"] for r in d["rows"]] == [2, 4] and d["n"] == 2
    r4 = d["rows"][1]  # seeds 0 and 1: lora_b_norm 0.4 and 1.4, adv_zero_frac 0.2
    assert r4["lora_b_norm"] == pytest.approx(0.9) and r4["kl"] == pytest.approx(4e-3)
    assert r4["adv_zero_frac"] == pytest.approx(0.2) and r4["accuracy"] == pytest.approx(0.3)
    assert r4["per_tag"]["counting"] == pytest.approx(0.15)
    res = B.write_outputs(str(tmp_path / "out"), c, "cmd", sweep=c)
    assert [r["key"] for r in res["sweep"]] == ["awm", "flow_grpo"]
    assert res["sweep"][1]["drop"] == pytest.approx(0.0)
    assert res["sweep"][0]["final_reward"] == pytest.approx(0.9)
    md = open(res["paths"]["md"]).read()
    assert "Learning-rate sweep" in md and "What moves" in md and "| 0.400 (2) | 0.300 (4) | 0.100 |" in md
    assert os.path.basename(res["paths"]["png"][-1]) == "toy_awm_vs_flow_grpo_drift.png"
    assert os.path.getsize(res["paths"]["png"][-1]) > 0


def test_lr_grid_per_method():
    a = B.parse_args(["--methods", "awm", "flow_grpo", "--lrs", "1e-3", "3e-3",
                      "--lr-grid", "flow_grpo=3e-3,1e-2"])
    assert B.lr_grids(a) == {"awm": ["1e-3", "3e-3"], "flow_grpo": ["3e-3", "1e-2"]}
    assert B.lr_grids(B.parse_args(["--methods", "awm"])) == {"awm": [None]}
    with pytest.raises(SystemExit, match="--lr-grid 'nft=1e-3'"):
        B.lr_grids(B.parse_args(["--methods", "awm", "--lr-grid", "nft=1e-3"]))


def test_report_without_flow_grpo_has_no_headline(tmp_path):
    """Methods without a Flow-GRPO run (e.g. only the issue-17 objectives): the report is written, no A*."""
    for seed in (0, 1):
        _fake_run(tmp_path, "awm", seed, [0.2, 0.3, 0.25], sps=128.0)
    res = B.write_outputs(str(tmp_path / "out"), B.load_curves(str(tmp_path), [0, 1], ["awm"]), "cmd")
    assert res["headline"] is None and res["stability"]["awm"]["drop"] == pytest.approx(0.05)
    assert "No headline" in open(res["paths"]["md"]).read()


def test_fine_start_twin_merges_its_evaluations(tmp_path):
    """<workdir>_fine (same first steps, eval every step) adds the step-1/3 evaluations; a twin whose rewards
    differ is refused."""
    wd = _fake_run(tmp_path, "awm", 0, [0.2, 0.3, 0.4], sps=128.0)
    fine = _fake_run(tmp_path / "f", "awm", 0, [0.2, 0.3, 0.4], sps=128.0)
    _write(os.path.join(fine, "eval.jsonl"), [{"step": s, "accuracy/overall": a} for s, a in
                                              ((0, 0.2), (1, 0.25), (2, 0.3), (3, 0.33))])
    os.rename(fine, wd + B.FINE)
    run = B.load_run(wd)
    assert [int(e["step"]) for e in run["evals"]] == [0, 1, 2, 3, 4]
    assert run["evals"][1]["accuracy/overall"] == 0.25 and run["evals"][2]["accuracy/counting"] == 0.15
    _write(os.path.join(wd + B.FINE, "metrics.jsonl"), [{"step": 1, "reward_mean": 9.0, "loss": 0.0}])
    with pytest.raises(ValueError, match="not its twin"):
        B.load_run(wd)
    cmd = B.train_command("awm", "/w_fine", 1, 2, ["eval.every=2", "eval.every=1"], lr="1e-2")
    assert cmd[-2:] == ["--config.eval.every=2", "--config.eval.every=1"]  # the last override wins
