"""Export of Flax LoRA weights to diffusers: peft LoRA folder and merged weights reproduce the Flax output."""

import json

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from flax import nnx

from awm_jax import export as ex
from awm_jax.convert import ConversionError
from awm_jax.convert import lora_export as le
from awm_jax.models import load_transformer
from awm_jax.models.lora import LoRAConfig, LoRAParam

CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
           pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
           dual_attention_layers=(0,))
INFO = dict(rank=4, alpha=8.0, base_model="tiny", algorithm="awm", reward="toy_geneval", step=7,
            which="policy")


def _key(path):
    return ".".join(str(getattr(p, "key", p)) for p in path)


def _randomize_lora_b(model, rng):
    """Give every LoRA B a random non-zero value (in place); return all LoRA arrays by per-layer path."""
    lora = {}
    for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        val = np.asarray(v[...])
        if p[-1] == "lora_b":
            val = rng.normal(0, 0.3, val.shape).astype(np.float32)
            v[...] = val
        lora[_key(p)] = val
    return lora


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    SD3Transformer2DModel(**CFG).eval().save_pretrained(root / "base")
    model = load_transformer(root / "base", lora=LoRAConfig(rank=4, alpha=8))
    rng = np.random.default_rng(0)
    lora = _randomize_lora_b(model, rng)
    le.save_flax_lora(lora, INFO, root / "ckpt")
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    enc = rng.normal(size=(2, 5, 16)).astype(np.float32)
    pooled = rng.normal(size=(2, 12)).astype(np.float32)
    t = np.array([300.0, 800.0], np.float32)
    ref = np.asarray(model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t))
    return root, lora, (x, enc, pooled, t), ref


def _torch_out(m, inputs):
    with torch.no_grad():
        x, enc, pooled, t = (torch.from_numpy(a) for a in inputs)
        return m(x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample.numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_peft_lora_parity(setup):
    root, _, inputs, ref = setup
    dst = ex.export_peft_lora(root / "ckpt", root / "peft", CFG)
    assert (dst / le.PEFT_WEIGHTS).is_file()
    m = SD3Transformer2DModel.from_pretrained(root / "base").eval()
    base = _torch_out(m, inputs)
    m.load_lora_adapter(str(dst), prefix="transformer", weight_name=le.PEFT_WEIGHTS)
    out = _torch_out(m, inputs)
    assert _rel(base, ref) > 1e-3  # the adapter matters
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    card = (dst / "README.md").read_text()
    for f in ("base_model: tiny", "algorithm: awm", "reward: toy_geneval", "step: 7", "rank: 4",
              "alpha: 8.0"):
        assert f in card


def test_merged_parity(setup):
    from tools.convert_weights import main

    root, _, inputs, ref = setup
    assert main(["to-diffusers", "--model", "sd3", "--src", str(root / "base"), "--dst", str(root / "merged"),
                 "--merge-lora", str(root / "ckpt")]) == 0
    m = SD3Transformer2DModel.from_pretrained(root / "merged").eval()
    assert _rel(_torch_out(m, inputs), ref) <= 1e-5
    assert "which: policy" in (root / "merged" / "README.md").read_text()


def test_bad_inputs(setup, tmp_path):
    root, lora, _, _ = setup
    with pytest.raises(ConversionError, match="missing lora_config.json"):
        le.load_flax_lora(tmp_path)
    bad = dict(lora, **{"transformer_blocks.0.nope.lora_a": np.zeros((16, 4), np.float32),
                        "transformer_blocks.0.nope.lora_b": np.zeros((4, 16), np.float32)})
    with pytest.raises(ConversionError, match="transformer_blocks.0.nope"):
        le.lora_to_peft(bad, CFG, 4, 8.0, "sd3")
    from tools.convert_weights import main
    assert main(["export-lora", "--model", "sd3", "--base", str(root / "base"), "--src", str(tmp_path),
                 "--dst", str(tmp_path / "o")]) == 2
    assert json.loads((root / "ckpt" / le.FLAX_LORA_CONFIG).read_text())["rank"] == 4


# ------------------------------------------------------------------------------------------ trainer workdirs


@pytest.fixture(scope="module")
def workdir(setup):
    """A trainer workdir as ``awm_jax.train`` writes it: config.json + Checkpointer(state leaves, meta)."""
    import jax

    from awm_jax import config_lib
    from awm_jax.checkpoint import Checkpointer
    from awm_jax.rl import train_step as ts
    from awm_jax.train import checkpoint_items

    root, _, inputs, _ = setup
    cfg = config_lib.load_config("configs/toy.py")
    cfg.model.path = str(root / "base")
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    graphdef, base_state, state = ts.create_train_state(load_transformer(root / "base"), cfg)
    rng = np.random.default_rng(1)

    def noisy(tree):  # non-zero B (and distinct A) so the adapters matter
        return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32), tree)

    state = state.replace(step=np.int32(3), trainable=noisy(state.trainable), eval_ema=noisy(state.eval_ema),
                          kl_ema=noisy(state.kl_ema))
    wd = root / "run"
    config_lib.save_config(cfg, str(wd))
    ck = Checkpointer(str(wd / "checkpoints"), keep=3, async_save=False)
    for step in (2, 3):
        ck.save(step, checkpoint_items(state, jax.random.key(0), {"step": step, "data_position": step}, cfg))
    ck.close()
    refs = {}
    for which, lora in (("policy", state.trainable), ("eval_ema", state.eval_ema)):
        model = nnx.merge(graphdef, lora, base_state)
        x, enc, pooled, t = inputs
        refs[which] = np.asarray(model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                                       timestep=t))
    return wd, refs


@pytest.mark.parametrize("which", ["policy", "eval_ema"])
def test_workdir_export_parity(setup, workdir, which):
    from tools.convert_weights import main

    root, _, inputs, _ = setup
    wd, refs = workdir
    dst = root / f"peft_{which}"
    assert main(["export-lora", "--src", str(wd), "--dst", str(dst), "--which", which]) == 0  # no --base
    m = SD3Transformer2DModel.from_pretrained(root / "base").eval()
    m.load_lora_adapter(str(dst), prefix="transformer", weight_name=le.PEFT_WEIGHTS)
    out = _torch_out(m, inputs)
    assert _rel(refs["policy"], refs["eval_ema"]) > 1e-3  # the two adapters differ
    assert _rel(out, refs[which]) <= 1e-5, _rel(out, refs[which])
    card = (dst / "README.md").read_text()
    assert f"which: {which}" in card and "step: 3" in card and "algorithm: awm" in card


def test_workdir_merge_and_step(setup, workdir):
    from tools.convert_weights import main

    root, _, inputs, _ = setup
    wd, refs = workdir
    assert main(["to-diffusers", "--model", "sd3", "--src", str(root / "base"),
                 "--dst", str(root / "wmerged"), "--merge-lora", str(wd), "--step", "2"]) == 0
    m = SD3Transformer2DModel.from_pretrained(root / "wmerged").eval()
    assert _rel(_torch_out(m, inputs), refs["policy"]) <= 1e-5
    params, info = ex.lora_from_workdir(wd, step=2)
    assert info["step"] == 2 and info["rank"] == 4 and info["base_model"] == str(root / "base")
    assert "transformer_blocks.0.attn.to_q.lora_a" in params
    assert not any(".attn2." in k for k in params)  # the reference's targets (PEFT rule) leave attn2 alone


def test_workdir_reads_the_checkpoints_own_config(workdir, tmp_path):
    """A resumed run's config.json is not what step 2 was trained with: export and ``sample --run`` read the
    checkpoint's ``config`` item (issue 26: a changed lora.alpha in config.json scaled the export x2)."""
    import shutil

    from awm_jax.sample import run_config

    wd, _ = workdir
    cp = tmp_path / "run"
    shutil.copytree(wd, cp)
    cfg = json.loads((cp / "config.json").read_text())
    cfg["lora"]["alpha"], cfg["lora"]["rank"] = 16.0, 8
    (cp / "config.json").write_text(json.dumps(cfg))
    _, info = ex.lora_from_workdir(cp, step=2)
    assert info["alpha"] == 8.0 and info["rank"] == 4
    rc = run_config(str(cp), step=2)
    assert rc.lora.alpha == 8.0 and rc.lora.rank == 4


def test_workdir_errors(workdir, tmp_path):
    wd, _ = workdir
    with pytest.raises(ConversionError, match="unknown which='kl'"):
        ex.lora_from_workdir(wd, which="kl")
    with pytest.raises(ConversionError, match=r"no checkpoint at step 9 \(saved steps: \[2, 3\]\)"):
        ex.lora_from_workdir(wd, step=9)
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text((wd / "config.json").read_text())
    with pytest.raises(ConversionError, match=f"workdir {empty}: no checkpoint"):
        ex.lora_from_workdir(empty)
    with pytest.raises(ConversionError, match="not a trainer workdir"):
        ex.lora_from_workdir(tmp_path)


def test_workdir_scanned(setup, tmp_path):
    """A run with ``model.scan_layers``: stacked adapters are unstacked to per-layer diffusers modules."""
    import jax

    from awm_jax import config_lib
    from awm_jax.checkpoint import Checkpointer
    from awm_jax.rl import train_step as ts
    from awm_jax.train import checkpoint_items

    root, _, inputs, _ = setup
    cfg = config_lib.load_config("configs/toy.py")
    cfg.model.path = str(root / "base")
    with cfg.model.unlocked():
        cfg.model.scan_layers = True
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    model = load_transformer(root / "base", scan_layers=True)
    graphdef, base_state, state = ts.create_train_state(model, cfg)
    rng = np.random.default_rng(2)
    state = state.replace(trainable=jax.tree.map(
        lambda x: np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32), state.trainable))
    assert any(p[0] == "transformer_block_groups" for p, _ in nnx.to_flat_state(state.trainable))
    config_lib.save_config(cfg, str(tmp_path / "run"))
    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    ck.save(1, checkpoint_items(state, jax.random.key(0), {"step": 1}, cfg))
    ck.close()
    x, enc, pooled, t = inputs
    ref = np.asarray(nnx.merge(graphdef, state.trainable, base_state)(
        hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t))
    dst = ex.export_peft_lora(tmp_path / "run", tmp_path / "peft", CFG)
    m = SD3Transformer2DModel.from_pretrained(root / "base").eval()
    m.load_lora_adapter(str(dst), prefix="transformer", weight_name=le.PEFT_WEIGHTS)
    assert _rel(_torch_out(m, inputs), ref) <= 1e-5


def test_pipeline_load_lora_weights_parity(tmp_path):
    """StableDiffusion3Pipeline.load_lora_weights(DIR) takes the export and reproduces the Flax model."""
    from diffusers import StableDiffusion3Pipeline
    from tiny_pipeline import build_tiny_sd3_pipeline

    pipe_dir = build_tiny_sd3_pipeline(tmp_path / "pipe", seed=0)
    cfg = {k: v for k, v in json.loads((pipe_dir / "transformer" / "config.json").read_text()).items()
           if not k.startswith("_")}
    model = load_transformer(pipe_dir, lora=LoRAConfig(rank=4, alpha=8))
    rng = np.random.default_rng(1)
    lora = _randomize_lora_b(model, rng)
    le.save_flax_lora(lora, INFO, tmp_path / "ckpt")
    dst = ex.export_peft_lora(tmp_path / "ckpt", tmp_path / "peft", cfg)
    c, s = cfg["in_channels"], 8
    x = rng.normal(size=(2, c, s, s)).astype(np.float32)
    enc = rng.normal(size=(2, 5, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.normal(size=(2, cfg["pooled_projection_dim"])).astype(np.float32)
    t = np.array([250.0, 900.0], np.float32)
    ref = np.asarray(model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t))
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir)
    base = _torch_out(pipe.transformer.eval(), (x, enc, pooled, t))
    pipe.load_lora_weights(str(dst))
    out = _torch_out(pipe.transformer.eval(), (x, enc, pooled, t))
    assert _rel(base, ref) > 1e-3  # the adapter matters
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
