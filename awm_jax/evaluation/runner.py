"""Generate and score one subject on one benchmark, caching every image and every per-image result.

Output folder ``<out>/<label>/<benchmark>/``: ``manifest.json`` (what was evaluated: subject, prompts,
images per prompt, seed, block, sampler settings), ``images/<i>.png`` (image ``i`` = prompt ``i // k``,
sample ``i % k``) and ``scores.jsonl`` (one line per image and scorer). A second run reuses every image and
score already there and only generates / scores what is missing; a manifest that differs (another seed,
block, prompt set, step, ...) is an error naming the field, never a silent mix.

Generation follows the trainer's evaluation: the image list is cut into blocks of ``block`` =
``batch_size x device count`` images (the last one padded); block ``b`` samples with the noise of
``fold_in(key(seed), b)`` through the subject's eval rollout on the mesh, each host computing its
``1/process_count`` share of the block (``awm_jax.distributed``); process 0 writes the files and scores them.
Images are lossless PNGs, so scores from the cache equal scores of the fresh images.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax import distributed
from awm_jax.evaluation.benchmarks import EvalError, score_records, summarise

MANIFEST_KEYS = ("subject", "benchmark", "prompts", "num_prompts", "images_per_prompt", "seed", "block")


def _image_path(folder: str, i: int) -> str:
    return os.path.join(folder, "images", f"{i:06d}.png")


def check_manifest(folder: str, manifest: dict) -> None:
    """Write ``manifest.json`` or check that the cached one describes the same evaluation."""
    path = os.path.join(folder, "manifest.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        for k in MANIFEST_KEYS:
            if json.dumps(old.get(k), sort_keys=True) != json.dumps(manifest.get(k), sort_keys=True):
                raise EvalError(f"{path}: cached results were made with {k} = {old.get(k)!r}, this "
                                f"evaluation has {manifest.get(k)!r}; use another --out or remove {folder}")
        return
    if jax.process_index() == 0:
        os.makedirs(folder, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


def generate(subject, prompts: list[str], folder: str, block: int, seed: int, mesh,
             log=print) -> int:
    """Make every missing image of ``prompts`` (one entry per image) under ``folder``/images; returns how
    many blocks were generated."""
    from PIL import Image

    n = len(prompts)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    key = jax.random.key(seed)
    made = 0
    for b, start in enumerate(range(0, n, block)):
        idx = np.arange(start, min(start + block, n))
        have = all(  # process 0's files decide on every host
            os.path.isfile(_image_path(folder, int(i))) for i in idx)
        if distributed.broadcast_flag(have):
            continue
        full = np.concatenate([idx, np.repeat(idx[-1:], block - len(idx))])  # one shape: one compile
        pos = distributed.local_positions(block, block)
        emb, pooled = subject.pipeline.text_encoder.encode([prompts[int(i)] for i in full[pos]])
        e, p = distributed.to_global(np.asarray(emb), mesh), distributed.to_global(np.asarray(pooled), mesh)
        out = subject.rollout(subject.params, subject.base_state, jnp.asarray(e), jnp.asarray(p),
                              jax.random.fold_in(key, b))
        local = np.asarray(subject.pipeline.decode(distributed.local_rows(out["x0"])))
        images = distributed.gather_rows(local, pos, block)[:len(idx)]
        if jax.process_index() == 0:
            for i, img in zip(idx, images):
                Image.fromarray(np.asarray(img, np.uint8)).save(_image_path(folder, int(i)))
        made += 1
        log(f"  {subject.label}: block {b + 1}/{-(-n // block)} ({len(idx)} images)")
    return made


def load_images(folder: str, indices) -> np.ndarray:
    """uint8 (N,H,W,3) cached images."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(_image_path(folder, int(i))).convert("RGB")) for i in indices])


def read_scores(folder: str) -> dict[tuple[str, int], dict]:
    """Cached per-image results ``{(scorer, i): record}`` (a cut last line is ignored)."""
    path = os.path.join(folder, "scores.jsonl")
    out: dict[tuple[str, int], dict] = {}
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out[(rec["scorer"], int(rec["i"]))] = rec
    return out


def score(folder: str, prompts: list[str], metadata: list[dict], scorers: dict, metric: str | None,
          batch: int = 32, log=print) -> dict[str, list[dict]]:
    """Score every image with every scorer, computing only what ``scores.jsonl`` lacks; returns
    ``{scorer: [record per image]}`` (process 0; other hosts return {})."""
    if jax.process_index() != 0:
        return {}
    cache = read_scores(folder)
    path = os.path.join(folder, "scores.jsonl")
    n = len(prompts)
    for name, scorer in scorers.items():
        missing = [i for i in range(n) if (name, i) not in cache]
        for s in range(0, len(missing), batch):
            idx = missing[s:s + batch]
            recs = score_records(name, scorer, load_images(folder, idx), [prompts[i] for i in idx],
                                 [metadata[i] for i in idx], metric=name == metric)
            with open(path, "a", encoding="utf-8") as f:
                for i, rec in zip(idx, recs):
                    full = {"scorer": name, "i": int(i), "prompt": prompts[i], **rec}
                    cache[(name, int(i))] = full
                    f.write(json.dumps(full, sort_keys=True) + "\n")
        if missing:
            log(f"  scored {len(missing)} images with {name!r}")
    return {name: [cache[(name, i)] for i in range(n)] for name in scorers}


def evaluate_subject(subject, bench, dataset, scorers: dict, out: str, images_per_prompt: int, seed: int,
                     block: int, mesh, log=print) -> dict:
    """Generate (cached) and score (cached) one subject on one benchmark; returns
    ``{"summary": {metric: value}, "records": {scorer: [...]}, "folder": ...}``."""
    k = int(images_per_prompt)
    prompts = [p for p in dataset.prompts for _ in range(k)]
    metadata = [m for m in dataset.metadata for _ in range(k)]
    folder = os.path.join(out, subject.label, bench.name)
    manifest = {"subject": subject.describe(), "benchmark": bench.name, "prompts": dataset.source,
                "num_prompts": len(dataset), "images_per_prompt": k, "seed": int(seed), "block": int(block)}
    check_manifest(folder, manifest)
    made = generate(subject, prompts, folder, block, seed, mesh, log)
    records = score(folder, prompts, metadata, scorers, bench.metric, log=log)
    summary: dict[str, float] = {}
    for name, recs in records.items():
        summary.update(summarise(name, recs, bench.name))
    return {"summary": summary, "records": records, "folder": folder, "generated_blocks": made,
            "num_images": len(prompts)}
