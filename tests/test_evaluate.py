"""``python -m awm_jax.evaluate``: a toy run (two checkpoint items side by side) on the toy benchmark and a
tiny SD3 run beside its base pipeline on GenEval's protocol with tiny reward models; every cached image and
score is reused by a second run; bad input is named."""

import json
import os

import jax
import numpy as np
import pytest

from awm_jax import config_lib, evaluate, sample, train
from awm_jax.checkpoint import Checkpointer
from awm_jax.evaluation import runner
from awm_jax.models.family import get_family
from awm_jax.rewards import geneval_rules as R
from awm_jax.rewards.tiny import save_tiny_clip, save_tiny_detr
from awm_jax.rl import train_step as ts
from awm_jax.toy import world
from awm_jax.toy.reward import ToyGenEvalScorer
from tests.tiny_pipeline import build_tiny_sd3_pipeline
from tests.toy_tiny import tiny_toy_config

TOY = "configs/toy.py"
SAMPLE = "tests/data/prompts/geneval_sample.jsonl"
CLASSES = ("bench", "bicycle", "car", "cat", "clock", "dog", "teddy bear", "umbrella")


def _run(argv):
    args = evaluate.parse_args(argv)
    return evaluate.evaluate(args, log=lambda *_: None)


def _noisy(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32), tree)


def _save_run(wd, cfg, state, step):
    config_lib.save_config(cfg, wd)
    ck = Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
    meta = {"step": step, "data_position": step}
    ck.save(step, train.checkpoint_items(state, jax.random.key(0), meta, cfg))
    ck.close()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy run on a tiny toy model whose trainable and eval-EMA adapters are different noise."""
    root = tmp_path_factory.mktemp("toy_run")
    tcfg = tiny_toy_config()
    world.save_toy_checkpoint(str(root / "tiny"), *world.build_models(tcfg, 0), tcfg)
    c = config_lib.load_config(TOY)
    config_lib.apply_overrides(c, [("model.path", str(root / "tiny")), ("sample.batch_size", "1"),
                                   ("eval.num_steps", "2")])
    pipe = get_family("toy").load_pipeline(c)
    _, _, state = ts.create_train_state(pipe.transformer, c)
    state = state.replace(trainable=_noisy(state.trainable, 1), eval_ema=_noisy(state.eval_ema, 2))
    _save_run(str(root / "run"), c, state, 1)
    return str(root / "run")


@pytest.fixture(scope="module")
def toy_eval(toy_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_eval"))
    argv = ["--run", toy_run, "--run", toy_run, "--which", "eval_ema", "--benchmark", "toy",
            "--prompts", "toy:heldout@1", "--out", out, "--batch-size", "1", "--grid-images", "4"]
    return argv, out, _run(argv)


def test_toy_benchmark_side_by_side(toy_eval):
    argv, out, res = toy_eval
    per = res["benchmarks"]["toy"]
    assert list(per) == ["run@1", "run@1.eval_ema"]
    tags = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for r in per.values():
        s = r["summary"]
        assert {k.split("/", 1)[1] for k in s if k.startswith("accuracy/")} == tags | {"overall", "images"}
        # every number recomputed from the cached PNGs by the toy scorer itself
        recs = [json.loads(line) for line in open(os.path.join(r["folder"], "scores.jsonl"))]
        assert len(recs) == r["num_images"] == 6
        prompts = [x["prompt"] for x in sorted(recs, key=lambda x: x["i"])]
        from awm_jax.data import load_dataset

        ds = load_dataset("toy:heldout@1", "geneval")
        assert prompts == ds.prompts
        ev = ToyGenEvalScorer().evaluate(runner.load_images(r["folder"], range(6)), ds.prompts, ds.metadata)
        acc = np.asarray(ev["accuracy"], np.float64)
        per_tag = [acc[[t == x for x in ev["tag"]]].mean() for t in sorted(tags)]
        assert s["accuracy/overall"] == pytest.approx(float(np.mean(per_tag)))
        assert s["accuracy/images"] == pytest.approx(float(acc.mean()))
    a, b = (runner.load_images(per[k]["folder"], range(6)) for k in per)
    assert not np.array_equal(a, b), "the eval_ema item must sample other images than the trainable one"
    md = open(os.path.join(out, "results.md")).read()
    assert "| accuracy/overall |" in md and "run@1.eval_ema" in md
    assert os.path.isfile(os.path.join(out, "grid_toy.png"))
    assert os.path.isfile(os.path.join(per["run@1"]["folder"], "grid.png"))


def test_second_run_reuses_the_cache(toy_eval, monkeypatch):
    argv, out, res = toy_eval
    folder = res["benchmarks"]["toy"]["run@1"]["folder"]
    before = runner.load_images(folder, range(6))
    lines = open(os.path.join(folder, "scores.jsonl")).readlines()
    with open(os.path.join(folder, "scores.jsonl"), "w") as f:
        f.writelines(lines[:2])  # 4 scores lost: only those are recomputed
    os.remove(os.path.join(folder, "images", "000005.png"))  # one image lost: its block alone is redone
    calls = []
    orig = runner.score_records

    def counted(name, sc, imgs, *a, **k):
        calls.append(len(imgs))
        return orig(name, sc, imgs, *a, **k)

    monkeypatch.setattr(runner, "score_records", counted)
    again = _run(argv)
    assert again["benchmarks"]["toy"]["run@1"]["summary"] == res["benchmarks"]["toy"]["run@1"]["summary"]
    assert sum(calls) == 4
    np.testing.assert_array_equal(runner.load_images(folder, range(6)), before)
    blocks = [json.loads(open(os.path.join(out, lab, "toy", "manifest.json")).read())["block"]
              for lab in ("run@1",)]
    assert blocks == [jax.device_count()]


def test_changed_settings_are_refused(toy_eval, capsys):
    argv, out, _ = toy_eval
    assert evaluate.main([*argv, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "seed = 0" in err and "manifest.json" in err


def test_named_errors(toy_run, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert evaluate.main(["--run", toy_run, "--benchmark", "geneval", "--prompts", str(tmp_path / "no.jsonl"),
                          "--out", out]) == 2
    assert "no.jsonl" in capsys.readouterr().err
    assert evaluate.main(["--run", toy_run, "--benchmark", "geneval", "--prompts", SAMPLE,
                          "--reward", f"geneval.detector_path={tmp_path}/nodet", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "nodet" in err and "geneval.detector_path" in err
    assert evaluate.main(["--run", str(tmp_path), "--benchmark", "toy", "--out", out]) == 2
    assert "not a trainer workdir" in capsys.readouterr().err
    assert evaluate.main(["--run", toy_run, "--step", "7", "--benchmark", "toy", "--out", out]) == 2
    assert "step 7" in capsys.readouterr().err
    argv = ["--run", toy_run, "--benchmark", "drawbench", "--prompts", SAMPLE, "--out", out]
    assert evaluate.main(argv) == 2
    assert "--panel" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory):
    """A tiny SD3 pipeline, a run on it whose adapter is noise, a tiny DETR over the sample's classes and a
    tiny CLIP, and a GenEval prompt subset."""
    root = tmp_path_factory.mktemp("eval_sd3")
    pipe_dir = build_tiny_sd3_pipeline(root / "pipe")
    cfg = config_lib.load_config("configs/sd35m_geneval.py")
    cfg.model.path = str(pipe_dir)
    cfg.model.resolution, cfg.model.max_sequence_length, cfg.model.dtype = 16, 16, "float32"
    cfg.model.scan_layers, cfg.model.remat_policy = False, "none"
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    cfg.sample.batch_size, cfg.eval.num_steps = 1, 2
    pipe = get_family("sd35").load_pipeline(cfg)
    _, _, state = ts.create_train_state(pipe.transformer, cfg)
    _save_run(str(root / "run"), cfg, state.replace(trainable=_noisy(state.trainable, 0)), 3)
    return dict(pipe=str(pipe_dir), run=str(root / "run"), root=root,
                detr=save_tiny_detr(str(root / "detr"), class_names=CLASSES),
                clip=save_tiny_clip(str(root / "clip")))


def test_geneval_protocol_run_beside_its_base_model(sd3_world):
    w = sd3_world
    out = str(w["root"] / "out")
    tiny = [x for kv in ("model.resolution=16", "model.max_sequence_length=16", "model.dtype=float32",
                         "model.scan_layers=false", "model.remat_policy=none", "lora.rank=4",
                         "sample.batch_size=1") for x in ("--set", kv)]
    argv = [*tiny, "--run", w["run"], "--model", w["pipe"], "--benchmark", "geneval", "--prompts", SAMPLE,
            "--num-prompts", "4", "--images-per-prompt", "2", "--steps", "2", "--out", out,
            "--reward", f"geneval.detector_path={w['detr']}", "--reward", f"geneval.clip_path={w['clip']}",
            "--reward", "geneval.threshold=0.0", "--reward", "geneval.counting_threshold=0.0",
            "--panel", "pickscore", "--reward", f"pickscore.model_path={w['clip']}",
            "--reward", f"pickscore.processor_path={w['clip']}"]
    res = _run(argv)
    per = res["benchmarks"]["geneval"]
    assert list(per) == ["run@3", "pipe"]
    from awm_jax import rewards
    from awm_jax.data import load_prompts

    ds = load_prompts(SAMPLE, "geneval")
    prompts = [p for p in ds.prompts[:4] for _ in range(2)]
    metas = [m for m in ds.metadata[:4] for _ in range(2)]
    scorer = rewards.get("geneval", detector_path=w["detr"], clip_path=w["clip"], threshold=0.0,
                         counting_threshold=0.0)
    imgs = {}
    for label, r in per.items():
        assert r["num_images"] == 8
        imgs[label] = runner.load_images(r["folder"], range(8))
        assert imgs[label].shape == (8, 16, 16, 3)
        # GenEval's rules on the cached images, independently: per image, per tag, overall
        dets = scorer.detections(imgs[label], metas)
        acc = np.array([float(R.geneval_correct(d, m)[0]) for d, m in zip(dets, metas)])
        tags = [m["tag"] for m in metas]
        per_tag = {t: acc[[x == t for x in tags]].mean() for t in set(tags)}
        s = r["summary"]
        for t, v in per_tag.items():
            assert s[f"accuracy/{t}"] == pytest.approx(v)
        assert s["accuracy/overall"] == pytest.approx(np.mean(list(per_tag.values())))
        recs = sorted((json.loads(x) for x in open(os.path.join(r["folder"], "scores.jsonl"))),
                      key=lambda x: x["i"])
        assert [x["prompt"] for x in recs if x["scorer"] == "geneval"] == prompts
        # the quality panel: the registered reward's mean over the same cached images
        pick = rewards.get("pickscore", model_path=w["clip"], processor_path=w["clip"])
        assert s["pickscore"] == pytest.approx(float(np.mean(pick(imgs[label], prompts, metas))), rel=1e-5)
    assert not np.array_equal(imgs["run@3"], imgs["pipe"]), "the run's adapter must change the images"
    subjects = json.load(open(os.path.join(out, "results.json")))["subjects"]
    assert subjects["run@3"]["step"] == 3 and subjects["pipe"]["model"] == w["pipe"]
    assert "| pickscore |" in open(os.path.join(out, "results.md")).read()


def test_same_images_as_the_trainers_evaluation(toy_run, tmp_path):
    """``--seed <run seed + 7919>`` samples the images of the trainer's held-out evaluation (the trainer's one
    block of 6 runs unsharded, ours is padded to 8 and sharded over the 8 devices: equal up to float rounding,
    a few pixels one uint8 level apart; on one device with whole blocks they are bit-equal)."""
    from awm_jax import parallel
    from awm_jax.data import load_dataset

    c = config_lib.load_config(TOY)
    saved = json.load(open(os.path.join(toy_run, "config.json")))
    config_lib.apply_overrides(c, [("model.path", saved["model"]["path"]), ("sample.batch_size", "1"),
                                   ("eval.num_steps", "2"), ("eval.grid_images", "6")])
    comp = train.default_components(c)
    _, item = sample.restore_adapter(toy_run, "trainable", 1, {"trainable": comp.state.trainable})
    state = comp.state.replace(trainable=item)
    mesh = parallel.make_mesh(data=-1, fsdp=1, tensor=1)
    eval_set = load_dataset("toy:heldout@1", "geneval")
    _, grid, _ = train.evaluate(comp, c, state, comp.pipeline.text_encoder, eval_set, 1, mesh)
    out = str(tmp_path / "e")
    res = _run(["--run", toy_run, "--benchmark", "toy", "--prompts", "toy:heldout@1", "--out", out,
                "--batch-size", "1", "--seed", str(c.seed + 7919), "--grid-images", "0"])
    mine = runner.load_images(res["benchmarks"]["toy"]["run@1"]["folder"], range(6))
    diff = np.abs(mine.astype(int) - np.asarray(grid).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (diff.max(), (diff == 0).mean())
