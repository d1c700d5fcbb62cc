"""Config loading, overrides, validation and the shipped configs."""

import functools
import glob
import json
import os
import re

import jax
import pytest

from awm_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/awm_*.py are the builders (awm_base: every key; awm_families: Z-Image / Qwen-Image), not configs
SHIPPED = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("awm_"))


# the Flow-GRPO reference's own batch / step / evaluation settings (issue 13)
FLOW_GRPO_KEYS = {"eval.guidance_scale", "ema.eval_decay_max", "ema.eval_every", "data.prompts_per_step",
                  "train.steps_per_epoch"}

def _load(name):
    return config_lib.load_config(os.path.join(ROOT, "configs", name))


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_loads_and_validates(path):
    cfg = config_lib.load_config(path)
    config_lib.validate(cfg)
    assert cfg.data.group_size > 0 and cfg.max_steps > 0


def test_shipped_set_is_complete():
    names = {os.path.basename(p)[:-3] for p in SHIPPED}
    for task in ("geneval", "ocr", "pickscore"):
        for suffix in ("", "_paper", "_flow_grpo"):
            assert f"sd35m_{task}{suffix}" in names and f"flux_{task}{suffix}" in names
    assert "toy" in names


def test_public_code_defaults():
    g, o, p = _load("sd35m_geneval.py"), _load("sd35m_ocr.py"), _load("sd35m_pickscore.py")
    for c in (g, o, p):
        assert c.algorithm == "awm" and c.data.group_size == 24
        assert c.awm.train_timesteps == 6 and c.awm.weighting == "ghuber" and c.awm.ema_beta == 1.0
        assert c.sample.sampler == "sa_solver" and c.sample.num_steps == 14
        assert (c.lora.rank, c.lora.alpha, c.optim.lr) == (32, 64.0, 3e-4)
    assert (g.awm.beta, o.awm.beta, p.awm.beta) == (0.001, 0.003, 0.0001)
    assert (g.sample.noise_level, o.sample.noise_level, p.sample.noise_level) == (0.4, 0.4, 0.0)
    assert (g.data.prompts_per_step, o.data.prompts_per_step, p.data.prompts_per_step) == (72, 72, 24)
    assert (g.awm.timestep_sampler, p.awm.timestep_sampler) == ("discrete_wo_init", "discrete")


def test_paper_variants():
    betas = {"geneval": 0.4, "ocr": 0.4, "pickscore": 0.01}
    for task, beta in betas.items():
        c = _load(f"sd35m_{task}_paper.py")
        assert c.sample.sampler == "euler_maruyama" and c.awm.train_timesteps == 4
        assert c.awm.weighting == "uniform" and c.awm.beta == beta and c.awm.ema_beta == 0.0


def test_flux_configs():
    for task in ("geneval", "ocr", "pickscore"):
        a, g, pp = (_load(f"flux_{task}{s}.py") for s in ("", "_flow_grpo", "_paper"))
        for c in (a, g, pp):
            assert (c.model.kind, c.model.arch, c.model.max_sequence_length) == ("flux", "flux.1-dev", 512)
            assert (c.lora.rank, c.lora.alpha, tuple(c.lora.targets)) == (64, 128.0, ())  # family default
            assert c.sample.guidance_scale == 1.0 and c.model.guidance == 3.5  # no CFG: distilled guidance
        assert g.sample.sampler == "sde" and g.sample.noise_level == 0.9 and g.sample.num_steps == 6
        assert pp.sample.sampler == "euler_maruyama" and pp.sample.noise_level == 0.9
        diff = _diff(a.to_dict(), g.to_dict())
        assert all(_algorithm_key(k) for k in diff), diff
    assert _load("flux_pickscore_flow_grpo.py").flow_grpo.beta == 0.0


def _diff(a, b, prefix=""):
    out = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, prefix + k + ".")
        elif va != vb:
            out.add(prefix + k)
    return out


def _algorithm_key(k: str) -> bool:
    return k == "algorithm" or k.startswith(("sample.", "flow_grpo.")) or k in FLOW_GRPO_KEYS


def test_flow_grpo_differs_only_where_algorithms_differ():
    for task in ("geneval", "ocr", "pickscore"):
        a = _load(f"sd35m_{task}.py").to_dict()
        b = _load(f"sd35m_{task}_flow_grpo.py").to_dict()
        diff = _diff(a, b)
        assert "algorithm" in diff and b["algorithm"] == "flow_grpo"
        assert all(_algorithm_key(k) for k in diff), diff
        assert b["sample"]["sampler"] == "sde" and b["sample"]["num_steps"] == 10


def test_every_key_is_commented():
    src = open(os.path.join(ROOT, "configs", "awm_base.py")).read()
    body = src.split("def base_config")[1].split("    return c")[0].splitlines()
    keys = 0
    for prev, line in zip(body, body[1:]):
        if re.match(r"^\s+\w+\.\w+ = ", line) and "ConfigDict()" not in line:
            keys += 1
            assert "#" in line or prev.strip().startswith("#"), f"undocumented config key: {line.strip()}"
    assert keys > 60


def test_overrides_typed():
    cfg = _load("toy.py")
    config_lib.apply_overrides(cfg, [("max_steps", "3"), ("optim.lr", "1e-2"), ("lora.full_finetune", "true"),
                                     ("lora.targets", "to_q,to_k"), ("reward.name", "x")])
    assert cfg.max_steps == 3 and cfg.optim.lr == 1e-2 and cfg.lora.full_finetune is True
    assert cfg.lora.targets == ("to_q", "to_k") and cfg.reward.name == "x"
    with pytest.raises(config_lib.ConfigError, match="expected an int"):
        config_lib.apply_overrides(cfg, [("max_steps", "many")])


def test_unknown_key_suggests_closest():
    cfg = _load("toy.py")
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim\.lrr'.*'optim\.lr'"):
        config_lib.apply_overrides(cfg, [("optim.lrr", "1")])
    with pytest.raises(config_lib.ConfigError, match=r"'max_stepz'.*'max_steps'"):
        config_lib.apply_overrides(cfg, [("max_stepz", "1")])
    with pytest.raises(config_lib.ConfigError, match=r"'sampel\.num_steps'.*'sample\.num_steps'"):
        config_lib.apply_overrides(cfg, [("sampel.num_steps", "1")])


def test_validation_names_key():
    cfg = _load("toy.py")
    cfg.awm.weighting = "cubic"
    with pytest.raises(config_lib.ConfigError, match="awm.weighting"):
        config_lib.validate(cfg)
    cfg = _load("toy.py")
    cfg.data.group_size = 0
    with pytest.raises(config_lib.ConfigError, match="data.group_size"):
        config_lib.validate(cfg)
    cfg = _load("sd35m_ocr_flow_grpo.py")
    cfg.sample.sampler = "sa_solver"
    with pytest.raises(config_lib.ConfigError, match="flow_grpo"):
        config_lib.validate(cfg)


def test_parse_args_and_save(tmp_path):
    path, workdir, ov = config_lib.parse_args(
        ["--config", "configs/toy.py", "--workdir=/w", "--config.max_steps=4", "--config.optim.lr", "0.1"])
    assert (path, workdir, ov) == ("configs/toy.py", "/w", [("max_steps", "4"), ("optim.lr", "0.1")])
    with pytest.raises(config_lib.ConfigError, match="--bogus"):
        config_lib.parse_args(["--config", "a", "--workdir", "b", "--bogus=1"])
    cfg = _load("toy.py")
    config_lib.save_config(cfg, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["data"]["group_size"] == cfg.data.group_size


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="nope.py"):
        config_lib.load_config("/nonexistent/nope.py")


@functools.cache
def _abstract_sizes(kind, arch_items, rank, alpha, targets):
    """(base params, LoRA params) of the abstract model (nnx.eval_shape: no weights, no FLOPs)."""
    from flax import nnx

    from awm_jax.models import get_family
    from awm_jax.models.lora import LoRAConfig, LoRAParam

    fam = get_family(kind)
    tcfg = fam.config_from_dict(dict(arch_items))
    lora = LoRAConfig(rank=rank, alpha=alpha, target_modules=targets)
    # scan_layers: stacked blocks trace once (same parameter count as the per-layer layout, much faster)
    model = nnx.eval_shape(lambda: fam.build(tcfg, rngs=nnx.Rngs(0), lora=lora, scan_layers=True))
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return n_all - n_lora, n_lora


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_model_shapes_from_config(path):
    """Build every config's transformer + LoRA abstractly (jax.eval_shape, no weights) and check sizes."""
    cfg = config_lib.load_config(path)
    arch = config_lib.transformer_config(cfg)
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in arch.items()))
    from awm_jax.rl.train_step import lora_config

    targets = lora_config(cfg).target_modules  # () in a config: the model family's default targets
    assert targets
    n_base, n_lora = _abstract_sizes(cfg.model.kind, items, cfg.lora.rank, cfg.lora.alpha, tuple(targets))
    if cfg.model.arch == "sd3.5-medium":
        assert arch["num_layers"] == 24 and arch["num_attention_heads"] * arch["attention_head_dim"] == 1536
        assert 2.2e9 < n_base < 2.3e9, n_base  # SD3.5 Medium transformer: 2.24B parameters
        # r=32 on 8 attention projections of 24 blocks (+ 13 dual-attention ones), ~24M
        # the reference's attn.* targets: 24 blocks x 8 projections - the last block's to_add_out = 191
        # layers, each r (in + out) = 32 x (1536 + 1536) (attn2 of the 13 dual blocks not adapted)
        assert n_lora == 191 * 32 * (1536 + 1536), n_lora
    elif cfg.model.arch == "sd3.5-large":  # stabilityai/stable-diffusion-3.5-large: 8.1B parameters
        assert arch["num_layers"] == 38 and arch["num_attention_heads"] * arch["attention_head_dim"] == 2432
        assert 8.0e9 < n_base < 8.3e9, n_base
        assert n_lora == (38 * 8 - 1) * 32 * (2432 + 2432), n_lora  # the same attn.* targets, 38 blocks
    elif cfg.model.arch == "flux.1-dev":
        assert 11.8e9 < n_base < 12.0e9, n_base  # FLUX.1-dev transformer: 11.9B parameters
        assert 100e6 < n_lora < 400e6, n_lora  # r=64 on attention + feed-forward of 19 + 38 blocks
    elif cfg.model.arch == "z-image-turbo":
        assert 6.1e9 < n_base < 6.2e9, n_base  # Z-Image transformer: 6.15B parameters ("6B")
        # r=64 on q/k/v/out (3840 -> 3840) and SwiGLU w1/w3 (3840 -> 10240), w2 of 2 + 2 + 30 blocks
        assert n_lora == 34 * 64 * (4 * (3840 + 3840) + 3 * (3840 + 10240)), n_lora
    elif cfg.model.arch == "qwen-image":
        assert 20.4e9 < n_base < 20.5e9, n_base  # Qwen-Image transformer: 20.4B parameters
        # r=64 on 8 attention projections (3072 -> 3072) + 4 MLP linears (3072 <-> 12288) of 60 blocks
        assert n_lora == 60 * 64 * (8 * 6144 + 4 * 15360), n_lora
    else:
        assert n_base < 20e6 and n_lora > 0


def test_help_prints_usage_and_exits_zero(capsys):
    from awm_jax import config_lib

    with pytest.raises(SystemExit) as exc:
        config_lib.parse_args(["--help"])
    assert exc.value.code == 0
    assert "--workdir" in capsys.readouterr().out
