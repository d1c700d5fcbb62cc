"""The reward budget in the plan (awm_jax/reward_budget.py + its hook in awm_jax.plan.main)."""

import os

import pytest

from awm_jax import config_lib, reward_budget
from awm_jax import plan as plan_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**reward):
    config = config_lib.load_config(os.path.join(ROOT, "configs", "sd35m_geneval.py"))
    for k, v in reward.items():
        config.reward[k] = v
    return config


def _res(rollout_s=1.86, train_s=108.0, calls=27, topology="v6e:2x4", chips=8):
    return {"topology": topology, "chips": chips, "rollout_calls": calls, "rollout": {"est_s": rollout_s},
            "train_step": {"est_s": train_s}, "step_s": calls * rollout_s + train_s, "fits": True}


def test_geneval_on_a_v6e_8_host_is_host_bound():
    config = _config()
    b = reward_budget.budget(config, _res())
    n = config.data.prompts_per_step * config.data.group_size
    assert b["images"] == n == 1728 and b["vcpus_assumed"] and b["vcpus_per_chip"] == 22.5
    assert b["host_s"] == pytest.approx(n * reward_budget.COST["geneval"][0] / (8 * 22.5))  # ~133 s vs 50 s
    assert b["host_bound"] and b["step_s"] == pytest.approx(108.0 + b["host_s"])
    assert "HOST-BOUND" in reward_budget.fmt(b)
    b = reward_budget.budget(config, _res(), cores_per_chip=100)  # a bigger host hides it behind the rollouts
    assert not b["host_bound"] and b["step_s"] == pytest.approx(_res()["step_s"])
    assert "device-bound" in reward_budget.fmt(b) and "(given" in reward_budget.fmt(b)


def test_accelerator_remote_and_unknown_scorers():
    config = _config(name="pickscore")
    config.reward.pickscore.device = "accelerator"
    b = reward_budget.budget(config, _res())
    assert b["placement"] == "accelerator" and b["host_s"] == 0.0 and not b["host_bound"]
    b = reward_budget.budget(_config(remote=("http://10.0.0.2:8100",)), _res())
    assert b["placement"] == "remote" and b["host_s"] is None and "reward servers" in reward_budget.fmt(b)
    b = reward_budget.budget(_config(name="toy_geneval"), _res())
    assert b["vcpu_s_per_image"] is None and "no cost figure" in reward_budget.fmt(b)


def test_plan_prints_the_budget(monkeypatch, capsys):
    monkeypatch.setattr(plan_mod, "plan", lambda config, topology: _res(topology=topology))
    monkeypatch.setattr(plan_mod, "_fmt", lambda res: "PLAN")
    path = os.path.join(ROOT, "configs", "sd35m_geneval.py")
    rc = plan_mod.main(["--config", path, "--topology", "v6e:2x4", "--host-cores-per-chip", "45"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("PLAN\nreward budget ('geneval', 1728 images per step)")
    assert "8 chips x 45 host vCPUs (given" in out and "HOST-BOUND" in out  # 67 s of scoring > 50 s
