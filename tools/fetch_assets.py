"""Set up the real assets: model weights, prompt sets and reward models, in the layout the configs expect.

    python tools/fetch_assets.py [--root .] [--only sd35m prompts geneval pickscore flux] [--dry-run]
                                 [--offline] [--token TOKEN]

With network, downloads with ``huggingface_hub.snapshot_download`` (gated models -- SD3.5-Medium,
FLUX.1-dev -- need an accepted licence on the hub and your token: ``huggingface-cli login``, ``HF_TOKEN``
or ``--token``) and the Flow-GRPO prompt files over HTTPS, verifies every file, and prints the config
overrides to use. Offline
(``--offline``, ``HF_HUB_OFFLINE=1`` or no connection) it downloads nothing and prints what to copy where.
``--dry-run`` only verifies what is there and prints the plan. Exit 0 when every selected asset verifies.

The layout (relative to ``--root``; the shipped configs' defaults, so ``--root .`` needs no override):

    weights/sd3.5-medium/                          stabilityai/stable-diffusion-3.5-medium (diffusers folder)
    weights/flux.1-dev/                            black-forest-labs/FLUX.1-dev (diffusers; --only flux)
    weights/rewards/mask2former-swin-small-coco/   facebook/mask2former-swin-small-coco-instance (GenEval)
    weights/rewards/clip-vit-large-patch14/        openai/clip-vit-large-patch14 (GenEval colours)
    weights/rewards/pickscore_v1/                  yuvalkirstain/PickScore_v1 (PickScore model)
    weights/rewards/clip-vit-h-14/                 laion/CLIP-ViT-H-14-laion2B-s32B-b79K (its processor only)
    data/prompts/geneval_{train,test}_metadata.jsonl, ocr_{train,test}.txt, pickscore_{train,test}.txt
                                                   the prompt sets of the Flow-GRPO repository (dataset/)

OCR needs no download: the rapidocr wheel ships its ONNX models (``reward.ocr.*_model_path`` "" = those).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import urllib.request
from collections.abc import Callable

PROMPTS_URL = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset"
PIPELINE_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "scheduler")
CLIP_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
PROCESSOR_PATTERNS = ["*.json", "*.txt"]


@dataclasses.dataclass(frozen=True)
class Asset:
    """One thing to fetch: a hub repository (``repo``) or a file (``url``), saved at ``dest`` under root."""

    group: str  # --only name
    dest: str  # path under --root
    repo: str = ""  # hub repository id (snapshot_download)
    url: str = ""  # plain HTTPS file
    required: tuple[str, ...] = ()  # files / folders (relative to dest) that must exist after the download
    allow_patterns: tuple[str, ...] | None = None  # hub files to take (None: all)
    prompt_format: str = ""  # prompt files: the data format they are parsed with
    keys: tuple[str, ...] = ()  # config keys that take this path


def _pipeline(group, dest, repo, text, keys):
    files = PIPELINE_FILES + tuple(f"{t}/config.json" for t in text) + tuple(
        f"tokenizer{s}" for s in ("", "_2", "_3")[:len(text)])
    return Asset(group, dest, repo=repo, required=files, keys=keys)


def _prompts(task, fmt, files):
    out = []
    for split, name in files:
        key = "data.train_prompts" if split == "train" else "data.eval_prompts"
        remote = f"{task}/{split}_metadata.jsonl" if fmt == "geneval" else f"{task}/{split}.txt"
        out.append(Asset("prompts", f"data/prompts/{name}", url=f"{PROMPTS_URL}/{remote}", prompt_format=fmt,
                         keys=(f"{key}  ({task} configs)",)))
    return out


ASSETS: tuple[Asset, ...] = (
    _pipeline("sd35m", "weights/sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium",
              ("text_encoder", "text_encoder_2", "text_encoder_3"), ("model.path",)),
    _pipeline("flux", "weights/flux.1-dev", "black-forest-labs/FLUX.1-dev",
              ("text_encoder", "text_encoder_2"), ("model.path  (flux configs)",)),
    *_prompts("geneval", "geneval", (("train", "geneval_train_metadata.jsonl"),
                                      ("test", "geneval_test_metadata.jsonl"))),
    *_prompts("ocr", "ocr", (("train", "ocr_train.txt"), ("test", "ocr_test.txt"))),
    *_prompts("pickscore", "text", (("train", "pickscore_train.txt"), ("test", "pickscore_test.txt"))),
    Asset("geneval", "weights/rewards/mask2former-swin-small-coco",
          repo="facebook/mask2former-swin-small-coco-instance",
          required=("config.json", "preprocessor_config.json"), keys=("reward.geneval.detector_path",)),
    Asset("geneval", "weights/rewards/clip-vit-large-patch14", repo="openai/clip-vit-large-patch14",
          required=CLIP_FILES, keys=("reward.geneval.clip_path",)),
    Asset("pickscore", "weights/rewards/pickscore_v1", repo="yuvalkirstain/PickScore_v1",
          required=("config.json",), keys=("reward.pickscore.model_path",)),
    Asset("pickscore", "weights/rewards/clip-vit-h-14", repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
          required=CLIP_FILES, allow_patterns=tuple(PROCESSOR_PATTERNS),
          keys=("reward.pickscore.processor_path",)),
)
GROUPS = ("sd35m", "prompts", "geneval", "pickscore", "flux")
DEFAULT_GROUPS = ("sd35m", "prompts", "geneval", "pickscore")


def select(groups) -> list[Asset]:
    """The assets of ``groups`` (names of :data:`GROUPS`)."""
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        raise SystemExit(f"error: unknown --only {bad}; choose from {', '.join(GROUPS)}")
    return [a for a in ASSETS if a.group in groups]


def verify(asset: Asset, root: pathlib.Path) -> list[str]:
    """Problems with ``asset`` under ``root`` (empty: it is complete and, for prompt files, parses)."""
    dest = root / asset.dest
    if asset.url:
        if not dest.is_file():
            return [f"{dest}: missing"]
        from awm_jax.data import PromptFileError, load_prompts

        try:
            n = len(load_prompts(str(dest), asset.prompt_format))
        except PromptFileError as e:
            return [str(e)]
        return [] if n else [f"{dest}: no prompts"]
    if not dest.is_dir():
        return [f"{dest}: missing"]
    return [f"{dest / f}: missing" for f in asset.required if not (dest / f).exists()]


def _download_url(url: str, dest: pathlib.Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:  # noqa: S310 - fixed https URL
        f.write(r.read())
    os.replace(tmp, dest)


def fetch(asset: Asset, root: pathlib.Path, token: str | None, snapshot_download: Callable | None = None,
          download_url: Callable = _download_url) -> None:
    """Download ``asset`` into ``root`` (the hub through ``snapshot_download``; injectable for tests)."""
    dest = root / asset.dest
    if asset.url:
        download_url(asset.url, dest)
        return
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    dest.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id=asset.repo, local_dir=str(dest), token=token,
                      allow_patterns=list(asset.allow_patterns) if asset.allow_patterns else None)


def where_from(asset: Asset) -> str:
    """Where an asset comes from, for the offline instructions."""
    if asset.url:
        return f"{asset.url}"
    what = f"https://huggingface.co/{asset.repo}"
    return what + (f" (files {', '.join(asset.allow_patterns)})" if asset.allow_patterns else "")


def overrides(assets: list[Asset], root: pathlib.Path) -> list[str]:
    """The ``--config.KEY=PATH`` overrides for ``assets`` under ``root`` (none needed: root = the cwd)."""
    out = []
    for a in assets:
        for key in a.keys:
            k, _, note = key.partition("  ")
            out.append(f"--config.{k}={root / a.dest}" + (f"   # {note.strip()}" if note else ""))
    return out


def offline_explanation(assets: list[Asset], root: pathlib.Path) -> str:
    """What to copy where, for a machine without network."""
    lines = ["No network download (offline). Copy each asset from a machine with access:"]
    for a in assets:
        need = f"; must hold {', '.join(a.required)}" if a.required else ""
        lines.append(f"  {root / a.dest}\n      <- {where_from(a)}{need}")
    lines.append("Gated models (SD3.5, FLUX.1-dev) need their licence accepted on the hub first. Then rerun "
                 "with --dry-run to verify.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/fetch_assets.py", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=".", help="where the layout goes (default: the current directory)")
    p.add_argument("--only", nargs="+", default=list(DEFAULT_GROUPS), help=f"groups of {GROUPS}")
    p.add_argument("--token", default=None, help="hub token (default: HF_TOKEN / huggingface-cli login)")
    p.add_argument("--dry-run", action="store_true", help="verify and print the plan, download nothing")
    p.add_argument("--offline", action="store_true", help="download nothing, print what to copy where")
    return p.parse_args(argv)


def main(argv=None, snapshot_download: Callable | None = None, download_url: Callable = _download_url) -> int:
    """The CLI; returns 0 when every selected asset verifies, else 1."""
    args = parse_args(argv)
    root = pathlib.Path(args.root)
    assets = select(args.only)
    offline = args.offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    todo = [a for a in assets if verify(a, root)]
    if todo and not (args.dry_run or offline):
        for a in todo:
            print(f"fetching {where_from(a)} -> {root / a.dest}", flush=True)
            try:
                fetch(a, root, args.token, snapshot_download, download_url)
            except OSError as e:  # no connection, refused, gated without a token, ...
                print(f"error: {a.repo or a.url}: {e}", file=sys.stderr)
                offline = True
                break
    problems = {a: verify(a, root) for a in assets}
    for a in assets:
        print(f"{'ok     ' if not problems[a] else 'MISSING'} {root / a.dest}")
    bad = [a for a in assets if problems[a]]
    if bad:
        for a in bad:
            for p in problems[a]:
                if p != f"{root / a.dest}: missing":
                    print(f"  {p}")
        if offline or args.dry_run:
            print(offline_explanation(bad, root))
        return 1
    print("every asset verified; config overrides (not needed when --root is the directory you train from):")
    for line in overrides(assets, root.resolve()):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.exit(main())
