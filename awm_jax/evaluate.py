"""Score trained runs and pipelines on the papers' benchmarks, side by side.

    python -m awm_jax.evaluate --run runs/geneval [--which eval_ema] [--step N] --benchmark geneval \
        --out eval/
    python -m awm_jax.evaluate --model weights/sd3.5-medium --model weights/sd3.5-medium --lora export/lora \
        --benchmark geneval --benchmark ocr --out eval/
    python -m awm_jax.evaluate --run runs/toy --model awm_jax/toy/assets/toy_mmdit --config configs/toy.py \
        --benchmark toy --out eval/toy

Subjects (any number, in order; ``awm_jax.evaluation.subjects``): ``--run WORKDIR`` (``--which`` / ``--step``
after it pick its checkpoint item; the sampler settings are the checkpoint's own config) and ``--model DIR``
(``--lora X`` after it folds an exported LoRA in; ``--config FILE`` when the family's shipped config is not
the one to use; ``--set KEY=VALUE`` overrides a config key of every subject). Benchmarks
(``awm_jax.evaluation.benchmarks``): ``geneval`` (553 prompts x 4 images, GenEval's rules, per-tag and
overall accuracy), ``ocr``, ``pickscore``, ``drawbench`` (quality panel), ``toy``; ``--prompts PATH``
replaces the default prompt file, ``--images-per-prompt N`` the protocol's count.
Reward models are the paths of the shipped configs (``tools/fetch_assets.py`` layout) unless
``--reward NAME.KEY=VALUE`` says otherwise; ``--panel NAME ...`` adds registered rewards to every benchmark.

Outputs under ``--out``: ``results.json``, ``results.md`` (one table per benchmark, a column per subject),
``<label>/<benchmark>/{manifest.json, images/, scores.jsonl, grid.png}`` and ``grid_<benchmark>.png``.
Running the same command again reuses every cached image and score. Bad input: one ``error:`` line, exit 2.
Image noise comes from ``--seed`` per block as in the trainer's held-out evaluation, so ``--seed`` = the run's
``seed + 7919`` with the run's prompt set and block reproduces its ``eval.jsonl`` (checked on the README toy
run: ``--run runs/toy --benchmark toy --seed 7961`` gives its step-20 accuracy/overall 0.4444).
"""

from __future__ import annotations

import argparse
import sys

from awm_jax.evaluation.benchmarks import BENCHMARKS, EvalError
from awm_jax.evaluation.subjects import SubjectSpec


class _Subject(argparse.Action):
    """``--run`` / ``--model`` start a subject; ``--lora`` / ``--which`` / ``--step`` attach to the last."""

    def __call__(self, parser, ns, value, option=None):
        subjects = getattr(ns, "subjects", None) or []
        opt = self.dest
        if opt in ("run", "model"):
            subjects.append(SubjectSpec(opt, value))
        else:
            if not subjects:
                parser.error(f"--{opt} comes after the --run / --model it applies to")
            last = subjects[-1]
            if opt == "lora" and last.kind != "model":
                parser.error("--lora folds an exported LoRA into a --model; a --run restores its own adapter")
            if opt in ("which", "step") and last.kind != "run":
                parser.error(f"--{opt} picks a checkpoint of a --run")
            setattr(last, opt, int(value) if opt == "step" else value)
        ns.subjects = subjects


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m awm_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--run", action=_Subject, metavar="WORKDIR", help="a trainer workdir (repeatable)")
    p.add_argument("--model", action=_Subject, metavar="DIR", help="a pipeline folder (repeatable)")
    p.add_argument("--lora", action=_Subject, metavar="DIR", help="LoRA folded into the last --model")
    p.add_argument("--which", action=_Subject, choices=("trainable", "policy", "eval_ema", "kl_ema"),
                   help="the last --run's adapter item (default trainable)")
    p.add_argument("--step", action=_Subject, metavar="N", help="the last --run's step (default newest)")
    p.add_argument("--config", default=None, help="config file for --model subjects (default: the family's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every subject, e.g. model.resolution=1024 (repeatable)")
    p.add_argument("--benchmark", action="append", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--prompts", default=None, help="prompt file replacing the benchmark's (one benchmark)")
    p.add_argument("--images-per-prompt", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=0, help="evaluate the first N prompts only (0 = all)")
    p.add_argument("--panel", nargs="*", default=None, help="registered rewards scored on every benchmark")
    p.add_argument("--reward", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a reward's keyword, e.g. geneval.detector_path=DIR (repeatable)")
    p.add_argument("--out", required=True, help="output folder (results, cached images and scores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the config's eval.num_steps)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG (default: eval.guidance_scale)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per device per block (default: the config's sample.batch_size)")
    p.add_argument("--grid-images", type=int, default=16)
    p.add_argument("--jax-mem-fraction", type=float, default=0.6,
                   help="GPU memory JAX preallocates when a reward runs on cuda (awm_jax.accel_env)")
    p.add_argument("--compile-cache", default="", help="JAX compilation cache dir ('off' = none)")
    a = p.parse_args(argv)
    if not getattr(a, "subjects", None):
        p.error("give at least one --run WORKDIR or --model DIR")
    if a.prompts and len(a.benchmark) > 1:
        p.error("--prompts replaces one benchmark's prompt file: give one --benchmark with it")
    for name in ("images_per_prompt", "batch_size", "steps"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return a


def evaluate(a: argparse.Namespace, log=print) -> dict:
    """Evaluate per parsed arguments ``a``; returns the ``results.json`` object (plus ``markdown``)."""
    import jax

    from awm_jax import accel_env, compile_cache, parallel
    from awm_jax.evaluation import benchmarks as B
    from awm_jax.evaluation.report import write_reports
    from awm_jax.evaluation.runner import evaluate_subject
    from awm_jax.evaluation.subjects import load_subject

    options = B.parse_reward_options(a.reward)
    overrides = []
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EvalError(f"--set {item!r}: expected KEY=VALUE (a config key, e.g. model.resolution=1024)")
        overrides.append((key, value))
    benches = {n: B.get_benchmark(n) for n in dict.fromkeys(a.benchmark)}
    datasets, scorer_names = {}, {}
    for name, bench in benches.items():  # every prompt file and reward model checked before any model loads
        ds = B.load_benchmark_prompts(bench, a.prompts)
        if a.num_prompts:
            ds = type(ds)(ds.prompts[:a.num_prompts], ds.metadata[:a.num_prompts], ds.source)
        datasets[name] = ds
        panel = list(a.panel) if a.panel is not None else (B.default_panel(options) if bench.metric is None
                                                              else [])
        names = ([bench.metric] if bench.metric else []) + [n for n in panel if n != bench.metric]
        if not names:
            raise EvalError(f"--benchmark {name}: no reward to score it with: give --panel NAME ... with "
                            "their models (--reward NAME.KEY=PATH; candidates "
                            f"{', '.join(B.PANEL_CANDIDATES)})")
        scorer_names[name] = names
    problems = [f"--benchmark {b}: {p}" for b, names in scorer_names.items() for n in names
                for p in B.reward_problems(n, B.reward_kwargs(n, options))]
    if problems:
        raise EvalError("; ".join(problems))
    devices = [str(kw["device"]) for kw in options.values() if "device" in kw]
    note = accel_env.configure_gpu(devices, a.jax_mem_fraction)  # before JAX starts its GPU backend
    if note:
        log(note)
    compile_cache.enable(a.compile_cache)
    mesh = parallel.make_mesh(data=-1, fsdp=1, tensor=1)
    subjects, results, labels = [], {b: {} for b in benches}, {}
    for spec in a.subjects:
        s = load_subject(spec, mesh, a.config, a.steps, a.guidance_scale, overrides)
        base, n = s.label, 1
        while s.label in labels:  # the same subject twice (e.g. other --steps): unique folders
            n += 1
            s.label = f"{base}-{n}"
        labels[s.label] = s.describe()
        subjects.append(s)
        log(f"loaded {s.label}")
    scorers: dict = {}
    for bname, bench in benches.items():
        need = [n for n in scorer_names[bname] if n not in scorers]
        scorers.update(B.build_scorers(need, options, f"--benchmark {bname}"))
        for s in subjects:
            k = a.images_per_prompt or bench.images_per_prompt
            block = (a.batch_size or int(s.config.sample.batch_size)) * jax.device_count()
            log(f"{bname}: {s.label} ({len(datasets[bname])} prompts x {k})")
            results[bname][s.label] = evaluate_subject(
                s, bench, datasets[bname], {n: scorers[n] for n in scorer_names[bname]}, a.out, k, a.seed,
                block, mesh, log)
    if jax.process_index() != 0:
        return {}
    return write_reports(a.out, results, labels, benches, a.grid_images)


def main(argv=None) -> int:
    """CLI entry point: 0, or 2 after one ``error:`` line."""
    a = parse_args(argv)
    try:
        res = evaluate(a)
    except EvalError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if res:
        print(res["markdown"], flush=True)
        print(f"results: {a.out}/results.json, {a.out}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
