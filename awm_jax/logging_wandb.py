"""Weights & Biases output of the trainer (``log.wandb``): scalars, evaluation tables and image grids, the
config; ``"offline"`` writes a local run folder with no network (``wandb sync`` uploads it later).

The run lives in ``<WANDB_DIR or the workdir>/wandb/``; its id is kept in ``<workdir>/wandb_id.txt`` so a
resumed training continues the same W&B run (``resume="allow"``). ``wandb`` is the optional extra
``pip install 'awm_jax[wandb]'``; with ``log.wandb`` set and wandb missing the pre-flight says so.
"""

from __future__ import annotations

import importlib.util
import os
import secrets

import numpy as np

MODES = ("", "online", "offline")


def settings(config) -> dict | None:
    """The W&B settings of ``config.log`` (None when ``log.wandb`` is "")."""
    lg = config.log
    mode = str(lg.wandb)
    if not mode:
        return None
    return {"mode": mode, "project": str(lg.wandb_project), "name": str(lg.wandb_name),
            "tags": [str(t) for t in (lg.wandb_tags or ())], "config": config.to_dict()}


def _numbers(rec: dict) -> dict[str, float]:
    num = (int, float, np.floating, np.integer)
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, num) and not isinstance(v, bool)}


def problems(config) -> list[str]:
    """Pre-flight: ``log.wandb`` is a known mode and, when set, wandb is installed."""
    mode = config.log.wandb
    if mode not in MODES:
        return [f"config key 'log.wandb' = {mode!r}: expected one of {MODES} ('' = off)"]
    if mode and importlib.util.find_spec("wandb") is None:
        return [f"config key 'log.wandb' = {mode!r}: wandb is not installed (pip install 'awm_jax[wandb]', "
                "or --config.log.wandb='')"]
    return []


class WandbWriter:
    """One W&B run of a trainer workdir; the methods mirror TensorBoard's scalars and images."""

    def __init__(self, workdir: str, mode: str, project: str, name: str = "", tags=(), config=None,
                 start_step: int = 0):
        import json

        import wandb

        self._wandb = wandb
        id_file = os.path.join(workdir, "wandb_id.txt")
        run_id = open(id_file).read().strip() if os.path.isfile(id_file) else secrets.token_hex(4)
        root = os.environ.get("WANDB_DIR") or workdir
        os.makedirs(root, exist_ok=True)
        plain = json.loads(json.dumps(config or {}, default=str))
        name = name or os.path.basename(os.path.abspath(workdir))
        self.run = wandb.init(project=project or "awm-jax", name=name, tags=list(tags) or None,
                              config=plain, dir=root, mode=mode, id=run_id,
                              resume="allow")
        with open(id_file, "w") as f:
            f.write(run_id)
        self.start_step = start_step

    def scalars(self, prefix: str, step: int, rec: dict) -> None:
        """Every number of ``rec`` as ``<prefix>/<key>`` at ``step``."""
        out = {f"{prefix}/{k}": v for k, v in _numbers(rec).items()}
        if out:
            self.run.log(out, step=int(step))

    def eval_table(self, step: int, rec: dict, images=None, captions=None, grid_path: str | None = None
                   ) -> None:
        """An evaluation: its metrics as a table (metric, value), the grid PNG and a table of the grid's
        images with their captions (prompt, verdict, reward)."""
        wb = self._wandb
        metrics = [[k, v] for k, v in sorted(_numbers(rec).items())]
        out = {"eval/metrics": wb.Table(columns=["metric", "value"], data=metrics)}
        if grid_path:
            out["eval/grid"] = wb.Image(grid_path)
        if images is not None and len(images):
            caps = list(captions or [])
            rows = [[caps[i] if i < len(caps) else "", wb.Image(np.asarray(img))]
                    for i, img in enumerate(images)]
            out["eval/samples"] = wb.Table(columns=["caption", "image"], data=rows)
        self.run.log(out, step=int(step))

    def close(self) -> None:
        self.run.finish()
