"""The benchmarks of ``python -m awm_jax.evaluate`` and the reward scorers that score them.

A benchmark is a prompt set (a path or a registered prompt source such as ``toy:heldout@96``), its format,
the images per prompt of its protocol and the registered reward that gives its metric:

    geneval    data/prompts/geneval_test_metadata.jsonl  4 images / prompt  reward "geneval" (its
               ``evaluate``: GenEval's correctness rules; per-tag accuracy, overall = the mean over the tags)
    ocr        data/prompts/ocr_test.txt                 1 image / prompt   reward "ocr" (1 - normalised edit
               distance to the quoted text; mean = OCR accuracy, plus the exact-match fraction)
    pickscore  data/prompts/pickscore_test.txt           1 image / prompt   reward "pickscore" (mean)
    drawbench  data/prompts/drawbench.txt                1 image / prompt   the quality panel only
    toy        toy:heldout@96                            1 image / prompt   reward "toy_geneval" (as geneval)

The default prompt paths are the layout of ``tools/fetch_assets.py``, relative to the working directory;
``--prompts PATH`` replaces them. The *quality panel* (``--panel NAME ...``) scores every benchmark's images
with more registered rewards (any name of ``awm_jax.rewards.available()``, e.g. aesthetic, pickscore, and the
ones other modules register); drawbench without ``--panel`` takes every reward of :data:`PANEL_CANDIDATES`
that is registered and whose model paths are given.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import numpy as np

from awm_jax import rewards


class EvalError(ValueError):
    """Bad evaluation input (a benchmark, prompt file, reward model, run or output folder); the message
    names it. The CLI prints ``error: <message>`` and exits 2."""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    prompts: str  # default prompt spec (a path relative to the working directory, or "<scheme>:<spec>")
    fmt: str  # awm_jax.data prompt format
    images_per_prompt: int  # the protocol's images per prompt
    metric: str | None  # registered reward giving the benchmark's metric (None: the panel only)


BENCHMARKS = {
    "geneval": Benchmark("geneval", "data/prompts/geneval_test_metadata.jsonl", "geneval", 4, "geneval"),
    "ocr": Benchmark("ocr", "data/prompts/ocr_test.txt", "ocr", 1, "ocr"),
    "pickscore": Benchmark("pickscore", "data/prompts/pickscore_test.txt", "text", 1, "pickscore"),
    "drawbench": Benchmark("drawbench", "data/prompts/drawbench.txt", "text", 1, None),
    "toy": Benchmark("toy", "toy:heldout@96", "geneval", 1, "toy_geneval"),
}

# quality-panel rewards drawbench takes by default when registered and their models are given
PANEL_CANDIDATES = ("aesthetic", "pickscore", "hps", "imagereward", "clipscore")

# the model paths of the shipped configs' reward sections (tools/fetch_assets.py layout): defaults of
# rewards with a section in configs/awm_base.py; --reward NAME.KEY=VALUE overrides
_SECTION_DEFAULTS = {
    "geneval": {"detector_path": "weights/rewards/mask2former-swin-small-coco",
                "clip_path": "weights/rewards/clip-vit-large-patch14"},
    "pickscore": {"model_path": "weights/rewards/pickscore_v1",
                  "processor_path": "weights/rewards/clip-vit-h-14"},
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark ``name``; an unknown name is an :class:`EvalError` listing the valid ones."""
    if name not in BENCHMARKS:
        raise EvalError(f"--benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark_prompts(bench: Benchmark, spec: str | None = None):
    """The benchmark's :class:`awm_jax.data.PromptDataset` (``spec`` replaces its default prompt file)."""
    from awm_jax.data import PromptFileError, load_dataset

    spec = spec or bench.prompts
    if ":" not in spec.split("/")[0] and not os.path.isfile(spec):
        raise EvalError(f"--benchmark {bench.name}: prompt file {spec!r} not found (give --prompts PATH; "
                        "tools/fetch_assets.py puts the test sets under data/prompts/)")
    try:
        return load_dataset(spec, bench.fmt)
    except PromptFileError as e:
        raise EvalError(f"--benchmark {bench.name}: {e}") from None


def parse_reward_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["geneval.detector_path=/m", ...]`` -> ``{"geneval": {"detector_path": "/m"}}`` (values parsed as
    JSON when they are, else kept as text)."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, kw = key.partition(".")
        if not sep or not dot or not name or not kw:
            raise EvalError(f"--reward {item!r}: expected NAME.KEY=VALUE (e.g. geneval.detector_path=DIR)")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(name, {})[kw] = parsed
    return out


def reward_kwargs(name: str, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The keywords of reward ``name``: the shipped configs' defaults overridden by ``--reward`` options."""
    return {**_SECTION_DEFAULTS.get(name, {}), **options.get(name, {})}


def reward_problems(name: str, kwargs: dict[str, Any]) -> list[str]:
    """Why reward ``name`` cannot be built with ``kwargs`` (unknown name, a required model path not given, a
    given path missing), one message each naming the ``--reward`` option; loads no model."""
    try:
        factory = rewards.resolve(name)
    except KeyError as e:
        return [f"reward {name!r}: {e.args[0]}"]
    except ImportError as e:
        return [f"reward {name!r}: cannot import the scorer ({e})"]
    out = []
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for p in params.values():
        if p.name.endswith("_path") and p.default is inspect.Parameter.empty and p.name not in kwargs:
            out.append(f"reward {name!r} needs a model: give --reward {name}.{p.name}=PATH")
    for k, v in kwargs.items():
        if k.endswith("_path") and isinstance(v, str) and v and not os.path.exists(v):
            out.append(f"reward {name!r}: model {v!r} not found (--reward {name}.{k}=PATH)")
    return out


def default_panel(options: dict[str, dict[str, Any]]) -> list[str]:
    """The :data:`PANEL_CANDIDATES` that are registered and whose model paths are given and exist."""
    names = set(rewards.available())
    return [n for n in PANEL_CANDIDATES if n in names and not reward_problems(n, reward_kwargs(n, options))]


def build_scorers(names: list[str], options: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    """``{name: scorer}``; every problem of every reward is listed at once in one :class:`EvalError`."""
    problems = [p for n in names for p in reward_problems(n, reward_kwargs(n, options))]
    if problems:
        raise EvalError(f"{where}: " + "; ".join(problems))
    out = {}
    for n in names:
        try:
            out[n] = rewards.get(n, **reward_kwargs(n, options))
        except (rewards.RewardConfigError, TypeError, ValueError) as e:
            raise EvalError(f"{where}: reward {n!r}: {e}") from None
    return out


def score_records(name: str, scorer, images: np.ndarray, prompts: list[str], metadata: list[dict],
                  metric: bool) -> list[dict]:
    """Per-image result records of one scorer: the benchmark metric uses ``scorer.evaluate`` when it has
    one (``accuracy``, ``tag``, ``score``, ``reason``), else the reward (``reward``)."""
    if metric and hasattr(scorer, "evaluate"):
        ev = scorer.evaluate(images, prompts, metadata)
        out = []
        for j in range(len(images)):
            rec = {"accuracy": float(np.asarray(ev["accuracy"])[j])}
            for k in ("score", "strict_accuracy"):
                if k in ev:
                    rec[k] = float(np.asarray(ev[k])[j])
            for k in ("tag", "reason"):
                if k in ev:
                    rec[k] = str(ev[k][j])
            out.append(rec)
        return out
    r = np.asarray(scorer(images, prompts, metadata), np.float32)
    if r.shape != (len(images),):
        raise EvalError(f"reward {name!r} returned shape {r.shape} for {len(images)} images")
    return [{"reward": float(x)} for x in r]


def summarise(name: str, records: list[dict], bench: str) -> dict[str, float]:
    """Aggregates of one scorer's per-image records: GenEval-style ``accuracy/<tag>`` and
    ``accuracy/overall`` (the mean over the tags, GenEval's score) plus ``accuracy/images``; OCR's mean reward
    ``ocr/accuracy`` and ``ocr/exact``; any other reward's mean ``<name>``."""
    if not records:
        return {}
    if "accuracy" in records[0]:
        acc = np.array([r["accuracy"] for r in records], np.float64)
        out = {"accuracy/images": float(acc.mean())}
        tags = [r.get("tag", "") for r in records]
        per_tag = {t: float(acc[[x == t for x in tags]].mean()) for t in sorted(set(tags))}
        out.update({f"accuracy/{t}": v for t, v in per_tag.items()})
        out["accuracy/overall"] = float(np.mean(list(per_tag.values())))
        return out
    r = np.array([x["reward"] for x in records], np.float64)
    if name == "ocr":
        return {"ocr/accuracy": float(r.mean()), "ocr/exact": float((r >= 1.0 - 1e-6).mean())}
    return {name: float(r.mean())}
