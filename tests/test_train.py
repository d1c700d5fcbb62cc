"""The trainer loop: runs, logs, exact resume, SIGTERM, NaN skip, corrupt-checkpoint fallback, CLI errors.

The loop is tested with a tiny pure-JAX mock model family (``mock_components``, selected through
``config.components``) so these tests depend only on the loop itself; ``test_toy_end_to_end`` runs
the real toy pipeline + train step.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax import config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy.py")

# knobs of the mock, set by tests
MOCK = {"nan_calls": set(), "report_finite": True, "sleep": 0.0}


@flax.struct.dataclass
class MockState:
    step: jax.Array
    trainable: dict
    eval_ema: dict


class _Text:
    def encode(self, prompts):
        seeds = [int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) for p in prompts]
        emb = np.stack([np.random.default_rng(s).normal(size=(2, 4)) for s in seeds]).astype(np.float32)
        return emb, emb.mean(1)


class _Pipeline:
    text_encoder = _Text()
    latent_shape = (3, 4, 4)

    @staticmethod
    def decode(x):
        img = jax.nn.sigmoid(jnp.transpose(x, (0, 2, 3, 1)))
        return jnp.round(img * 255).astype(jnp.uint8)


class _Scorer:
    def __call__(self, images, prompts, metadata):
        return np.asarray(images, np.float32)[..., 0].mean((1, 2)) / 255.0

    def evaluate(self, images, prompts, metadata):
        r = self(images, prompts, metadata)
        return {"accuracy": (r > 0.5).astype(np.float32), "tag": [m.get("tag", "x") for m in metadata]}


def _cheap_noise(key, shape):
    """Deterministic pseudo-noise from a key (cheap to compile, unlike threefry on a loaded CPU)."""
    k = jax.random.key_data(key).astype(jnp.float32)
    n = np.prod(shape)
    return jnp.sin(jnp.arange(n, dtype=jnp.float32) * (k[0] % 1013 + 1.618) + k[1] % 997).reshape(shape)


@jax.jit
def _mock_rollout(params, base, emb, pooled, key):
    mean = (pooled @ params["w"])[:, :, None, None]
    return {"x0": mean + 0.5 * _cheap_noise(key, (emb.shape[0], 3, 4, 4))}


@jax.jit
def _mock_step(state, base, batch, key, inject_nan):
    def loss_fn(w):
        pred = (batch["pooled"] @ w)[:, :, None, None]
        noise = 0.01 * _cheap_noise(key, pred.shape)
        logp = -jnp.mean((batch["x0"] - pred - noise) ** 2, axis=(1, 2, 3))
        pl = -jnp.mean(batch["advantages"] * logp)
        kl = jnp.mean((w - base["w0"]) ** 2)
        return pl + 0.01 * kl, (pl, kl)

    (loss, (pl, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable["w"])
    loss = jnp.where(inject_nan, jnp.nan, loss)
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g))
    w = state.trainable["w"] - 0.5 * g + jnp.where(finite, 0.0, jnp.nan)
    new = MockState(state.step + 1, {"w": w}, {"w": 0.5 * state.eval_ema["w"] + 0.5 * w})
    guarded = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    return new, guarded, {"loss": loss, "policy_loss": pl, "kl": kl, "finite": finite}


def mock_components(config):
    """A 12-parameter 'model': x0 = pooled @ w + noise; SGD on an advantage-weighted regression."""
    calls = [0]

    def train_step(state, base, batch, key):
        calls[0] += 1
        if MOCK["sleep"]:
            time.sleep(MOCK["sleep"])
        new, guarded, metrics = _mock_step(state, base, batch, key, calls[0] in MOCK["nan_calls"])
        if MOCK["report_finite"]:
            return guarded, metrics
        metrics.pop("finite")
        return new, metrics  # an unguarded step: NaN weights after a bad update

    w0 = jax.random.normal(jax.random.key(config.seed), (4, 3)) * 0.1
    state = MockState(jnp.zeros((), jnp.int32), {"w": w0}, {"w": w0})
    return train.Components(_Pipeline(), state, {"w0": w0}, train_step, _mock_rollout, _mock_rollout,
                            _Scorer(), eval_params_of=lambda s: s.eval_ema)


def _cfg(**over):
    cfg = config_lib.load_config(TOY)
    base = {"components": "test_train:mock_components", "data.group_size": "4",
            "data.prompts_per_step": "4", "sample.batch_size": "1", "eval.samples_per_prompt": "2",
            "eval.every": "2", "eval.num_prompts": "4", "checkpoint.every": "1",
            "checkpoint.async_save": "false", "log.progress": "false", "max_steps": "4"}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    config_lib.apply_overrides(cfg, list(base.items()))
    return cfg


@pytest.fixture(autouse=True)
def _reset_mock():
    MOCK.update(nan_calls=set(), report_finite=True, sleep=0.0)
    sys.modules.setdefault("test_train", sys.modules[__name__])
    yield


def _metrics(wd):
    return [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("full"))
    sys.modules.setdefault("test_train", sys.modules[__name__])
    MOCK.update(nan_calls=set(), report_finite=True, sleep=0.0)
    train.run(_cfg(), wd)
    return wd


def test_run_writes_outputs(full_run):
    m = _metrics(full_run)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    need = {"step", "reward_mean", "reward_std", "loss", "policy_loss", "kl", "zero_std_frac",
            "samples_per_s", "wall_s"}
    assert need <= set(m[0])
    assert all(np.isfinite(r["loss"]) and 0 <= r["reward_mean"] <= 1 for r in m)
    ev = [json.loads(line) for line in open(os.path.join(full_run, "eval.jsonl"))]
    assert [e["step"] for e in ev] == [0, 2, 4] and "accuracy" in ev[0]  # step 0: the base model
    assert any(k.startswith("accuracy/") for k in ev[0]) and "accuracy/overall" in ev[0]
    assert os.path.isfile(os.path.join(full_run, "samples", "eval_000000.png"))
    assert os.path.isfile(os.path.join(full_run, "samples", "eval_000004.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(full_run, "tb")))
    assert json.load(open(os.path.join(full_run, "config.json")))["max_steps"] == 4


def test_exact_resume(full_run, tmp_path):
    wd = str(tmp_path)
    train.run(_cfg(max_steps=2), wd)
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:  # a step logged but never checkpointed
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    train.run(_cfg(max_steps=4), wd)
    a, b = _metrics(full_run), _metrics(wd)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    ev = [json.loads(line)["step"] for line in open(os.path.join(wd, "eval.jsonl"))]
    assert ev == [0, 2, 4]  # the step-0 evaluation is not repeated on resume
    for ra, rb in zip(a, b):
        for k in ("reward_mean", "reward_std", "loss", "policy_loss", "kl"):
            assert abs(ra[k] - rb[k]) <= 1e-4 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    assert a[-1]["loss"] != a[0]["loss"]  # the comparison is not vacuous


def test_nan_skip_and_stop(tmp_path):
    MOCK["nan_calls"] = {2}
    train.run(_cfg(max_steps=3), str(tmp_path / "a"))
    m = _metrics(str(tmp_path / "a"))
    assert [r["skipped"] for r in m] == [False, True, False]
    MOCK["nan_calls"] = {2, 3, 4}
    with pytest.raises(train.NonFiniteError, match="3 non-finite updates in a row"):
        train.run(_cfg(max_steps=6, train__max_nonfinite=3), str(tmp_path / "b"))
    assert [r["step"] for r in _metrics(str(tmp_path / "b"))] == [1, 2, 3, 4]


def test_nan_guard_wraps_step_without_finite_metric(tmp_path):
    MOCK.update(nan_calls={2}, report_finite=False)
    train.run(_cfg(max_steps=3, eval__every=0), str(tmp_path))
    m = _metrics(str(tmp_path))
    assert m[1]["skipped"] and not m[2]["skipped"] and np.isfinite(m[2]["loss"])


def test_corrupt_latest_checkpoint_falls_back(full_run, tmp_path):
    wd = str(tmp_path)
    train.run(_cfg(max_steps=3), wd)
    for root, _, files in os.walk(os.path.join(wd, "checkpoints", "3")):
        for f in files:
            if "ocdbt" in f:
                open(os.path.join(root, f), "wb").write(b"\0garbage")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train.run(_cfg(max_steps=4), wd)
    assert any("step 3" in str(x.message) for x in w)
    a, b = _metrics(full_run), _metrics(wd)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert abs(a[3]["loss"] - b[3]["loss"]) <= 1e-4 * max(1.0, abs(a[3]["loss"]))


def _cli(wd, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    args = [sys.executable, "-m", "awm_jax.train", "--config", TOY, "--workdir", wd,
            "--config.components=test_train:mock_components", "--config.data.group_size=4",
            "--config.data.prompts_per_step=4", "--config.sample.batch_size=1",
            "--config.eval.every=0", "--config.log.progress=false",
            "--config.checkpoint.every=1000", *extra]
    return args, env


def test_sigterm_saves_and_exits_zero(tmp_path):
    wd = str(tmp_path)
    args, env = _cli(wd, "--config.max_steps=100000", "--config.train.max_nonfinite=1")
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    path = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(open(path).readlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    last = _metrics(wd)[-1]["step"]
    steps = [int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()]
    assert steps == [last] and last < 100000


def test_old_positional_workdir_is_refused_by_name(tmp_path, capsys):
    """A workdir of the old positional checkpoint layout: one error line naming the format, exit 2, and
    nothing of the old run is touched."""
    from tests.test_checkpoint import write_positional_checkpoint

    ck = tmp_path / "checkpoints"
    write_positional_checkpoint(ck, 3)
    before = sorted(os.listdir(ck / "3"))
    args = _cli(str(tmp_path), "--config.max_steps=4")[0][3:]  # the CLI arguments, run in-process
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "old positional layout" in err and "start a new --workdir" in err
    assert sorted(os.listdir(ck)) == ["3"] and sorted(os.listdir(ck / "3")) == before


def test_cli_unknown_key(tmp_path):
    args, env = _cli(str(tmp_path), "--config.optim.learning_rat=1")
    res = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "optim.learning_rat" in res.stderr and "optim.lr" in res.stderr


def test_toy_end_to_end(tmp_path):
    """The real toy pipeline (random init) + train step + toy reward on the 8-device mesh: one step, then a
    resume to step 2 (restored state/RNG must land on the mesh), outputs and checkpoints."""

    def cfg(max_steps):
        c = config_lib.load_config(TOY)
        config_lib.apply_overrides(c, [
            ("model.path", ""), ("max_steps", str(max_steps)), ("data.group_size", "4"),
            ("data.prompts_per_step", "2"), ("sample.batch_size", "1"), ("sample.num_steps", "3"),
            ("train.micro_batch_size", "1"), ("eval.every", "2"), ("eval.num_prompts", "8"),
            ("eval.num_steps", "3"), ("eval.samples_per_prompt", "1"), ("log.progress", "false"),
            ("checkpoint.async_save", "false")])
        return c

    train.run(cfg(1), str(tmp_path))
    last = train.run(cfg(2), str(tmp_path))
    m = _metrics(str(tmp_path))
    assert [r["step"] for r in m] == [1, 2] and last["step"] == 2
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["reward_mean"] <= 1.0 for r in m)
    assert m[1]["kl_ema_decay"] > m[0]["kl_ema_decay"]  # the restored train state advanced
    ev = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert [e["step"] for e in ev] == [0, 1, 2] and 0.0 <= ev[-1]["accuracy"] <= 1.0
    assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_steps_per_epoch_parts_and_resume(tmp_path):
    """train.steps_per_epoch = 2: two optimizer steps per logged epoch on disjoint shuffled halves; resume
    reproduces an uninterrupted run."""
    batch = {"advantages": jnp.arange(8.0), "x0": jnp.arange(8.0)[:, None] * jnp.ones((8, 3)), "scalar": 1.0}
    parts = train.epoch_parts(batch, 2, jax.random.key(0))
    got = sorted(float(v) for p in parts for v in np.asarray(p["advantages"]))
    assert got == list(range(8)) and all(p["x0"].shape == (4, 3) and p["scalar"] == 1.0 for p in parts)
    np.testing.assert_array_equal(np.asarray(parts[0]["x0"])[:, 0], np.asarray(parts[0]["advantages"]))
    with pytest.raises(ValueError, match="train.steps_per_epoch"):
        train.epoch_parts(batch, 3, jax.random.key(0))
    full, wd = str(tmp_path / "full"), str(tmp_path / "resumed")
    train.run(_cfg(train__steps_per_epoch=2), full)
    train.run(_cfg(train__steps_per_epoch=2, max_steps=2), wd)
    train.run(_cfg(train__steps_per_epoch=2), wd)
    a, b = _metrics(full), _metrics(wd)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["opt_steps"] for r in a] == [2, 4, 6, 8]
    assert [r["opt_steps"] for r in b] == [2, 4, 6, 8]
    assert all(r["lora_norm"] > 0 and 0 <= r["adv_pos_frac"] <= 1 and r["adv_abs_mean"] >= 0 for r in a)
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * max(1.0, abs(ra["loss"]))
