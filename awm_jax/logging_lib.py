"""Trainer outputs: ``metrics.jsonl`` / ``eval.jsonl``, TensorBoard events, Weights & Biases
(:mod:`awm_jax.logging_wandb`), PNG sample grids, progress bar.

TensorBoard (``log.tensorboard``, on by default) needs tensorboardX, which the base install does not pull in:
without it the trainer says so in one line and writes everything else."""

from __future__ import annotations

import json
import math
import os
import textwrap

import numpy as np

__all__ = ["JsonlLog", "TrainLogger", "image_grid", "save_image_grid", "to_jsonable"]


def to_jsonable(value):
    """Convert numpy / jax scalars and arrays to plain Python for JSON."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        value = np.asarray(value).tolist()
        return to_jsonable(value) if isinstance(value, list) else value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan" / "inf": valid JSON, still visible
    return value


class JsonlLog:
    """Append-only JSON-lines log keyed by ``step``; resuming truncates records beyond a step."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step > step`` (and unparsable partial lines); return how many remain."""
        if not os.path.exists(self.path):
            return 0
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and int(rec.get("step", -1)) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        return len(keep)

    def write(self, record: dict) -> None:
        """Append one record (flushed)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(to_jsonable(record), sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        """All records."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def image_grid(images: np.ndarray, captions: list[str], cols: int | None = None, caption_lines: int = 3):
    """A PIL image grid of ``images`` (N,H,W,3 uint8) with each caption written under its image."""
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"image_grid expects (N,H,W,3) images, got shape {images.shape}")
    n, h, w, _ = images.shape
    cols = cols or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    scale = max(1, 128 // max(h, w))  # upscale tiny images so captions stay readable
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, cw // 6)
    cap_h = caption_lines * line_h + 4
    grid = Image.new("RGB", (cols * cw, rows * (ch + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(images[i].astype(np.uint8)).resize((cw, ch), Image.NEAREST)
        x, y = c * cw, r * (ch + cap_h)
        grid.paste(tile, (x, y))
        lines = textwrap.wrap(captions[i] if i < len(captions) else "", width=chars)[:caption_lines]
        for j, text in enumerate(lines):
            draw.text((x + 2, y + ch + 2 + j * line_h), text, fill="black", font=font)
    return grid


def save_image_grid(path: str, images: np.ndarray, captions: list[str]) -> str:
    """Write :func:`image_grid` as a PNG at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid(images, captions).save(path, format="PNG")
    return path


def _fmt(value, spec: str) -> str:
    """A progress-bar number: ``format(value, spec)`` for numbers, anything else (a non-finite value that
    :func:`to_jsonable` turned into ``"nan"``, a missing one) as its text."""
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return format(float(value), spec)
    return "nan" if value is None else str(value)


TENSORBOARD_MISSING = ("log.tensorboard: tensorboardX is not installed, so no TensorBoard events are written "
                       "(pip install 'awm_jax[tensorboard]'; --config.log.tensorboard=false silences this)")


def _tensorboard_writer(path: str, purge_step: int):
    """A tensorboardX ``SummaryWriter``, or None (after one line saying so) when tensorboardX is missing."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        print(TENSORBOARD_MISSING, flush=True)
        return None
    return SummaryWriter(path, purge_step=purge_step)


class TrainLogger:
    """metrics.jsonl + eval.jsonl + TensorBoard + W&B + tqdm, resumable at ``start_step``.

    ``wandb``: :func:`awm_jax.logging_wandb.settings` (None = off)."""

    def __init__(self, workdir: str, start_step: int, max_steps: int, tensorboard: bool = True,
                 progress: bool = True, is_main: bool = True, wandb: dict | None = None):
        self.workdir = workdir
        self.is_main = is_main
        self.metrics = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
        self.evals = JsonlLog(os.path.join(workdir, "eval.jsonl"))
        if is_main:
            self.metrics.truncate_after(start_step)
            self.evals.truncate_after(start_step)
        self._tb = None
        if tensorboard and is_main:
            self._tb = _tensorboard_writer(os.path.join(workdir, "tb"), start_step + 1)
        self._wb = None
        if wandb and is_main:
            from awm_jax.logging_wandb import WandbWriter

            self._wb = WandbWriter(workdir, start_step=start_step, **wandb)
        self._bar = None
        if progress and is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def _scalars(self, prefix: str, step: int, rec: dict) -> None:
        if self._wb is not None:
            self._wb.scalars(prefix, step, rec)
        if self._tb is None:
            return
        for k, v in rec.items():
            if k == "step":
                continue
            if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def log_step(self, record: dict) -> None:
        """One optimizer step's metrics (must contain ``step``)."""
        if not self.is_main:
            return
        record = to_jsonable(record)
        self.metrics.write(record)
        self._scalars("train", record["step"], record)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(reward=_fmt(record.get("reward_mean"), ".3f"),
                                  loss=_fmt(record.get("loss"), ".3e"))

    def log_eval(self, record: dict, images: np.ndarray | None = None, captions=None) -> None:
        """One evaluation's metrics, plus a PNG grid of its samples."""
        if not self.is_main:
            return
        record = to_jsonable(record)
        self.evals.write(record)
        self._scalars("eval", record["step"], record)
        path = None
        if images is not None and len(images):
            path = os.path.join(self.workdir, "samples", f"eval_{record['step']:06d}.png")
            save_image_grid(path, images, list(captions or []))
            if self._tb is not None:
                self._tb.add_image("eval/samples", np.asarray(images[0]), record["step"], dataformats="HWC")
        if self._wb is not None:
            self._wb.eval_table(record["step"], record, images, captions, path)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Flush and close."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wb is not None:
            self._wb.close()


def run_summary(workdir: str, last: dict, max_steps: int) -> str:
    """The end-of-run summary: steps done, the final held-out metrics, where checkpoints, grids and
    TensorBoard logs are."""
    import glob

    lines = [f"run finished: step {last.get('step', '?')} of {max_steps} in {workdir}"]
    if last:
        lines.append(f"  last step: reward_mean {_fmt(last.get('reward_mean'), '.4f')}, "
                     f"loss {_fmt(last.get('loss'), '.3e')}")
    path = os.path.join(workdir, "eval.jsonl")
    evals = JsonlLog(path).read() if os.path.isfile(path) else []
    if evals:
        first, final = evals[0], evals[-1]
        keys = [k for k in ("accuracy/overall", "accuracy", "reward_mean") if k in final]
        parts = ", ".join(f"{k} {_fmt(first.get(k), '.4f')} (step {first['step']}) -> {_fmt(final[k], '.4f')}"
                          for k in keys)
        lines.append(f"  held-out eval at step {final['step']}: {parts} ({path})")
    ck = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ck) if d.isdigit()) if os.path.isdir(ck) else []
    if steps:
        lines.append(f"  checkpoints: {ck} (steps {', '.join(map(str, steps))})")
    grids = sorted(glob.glob(os.path.join(workdir, "samples", "*.png")))
    if grids:
        newest = os.path.basename(grids[-1])
        lines.append(f"  image grids: {os.path.join(workdir, 'samples')} (newest {newest})")
    if os.path.isdir(os.path.join(workdir, "tb")):
        lines.append(f"  TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tb')}")
    lines.append(f"  metrics: {os.path.join(workdir, 'metrics.jsonl')}")
    return "\n".join(lines)
