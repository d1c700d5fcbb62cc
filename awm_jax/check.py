"""Pre-flight checks of a training run: everything the config names, checked before any model loads.

``python -m awm_jax.train --config C --workdir W [--config.KEY=V ...] --check`` runs only these checks
(also ``python -m awm_jax.check`` with the same arguments) and exits 0 when the run can start, else 2.
The trainer runs them first, before anything is written.

Checked, each problem reported with its config key and path, ALL problems at once:

- the config values (``config_lib.validate``) and the components factory (``components``);
- the workdir (a directory, or one that can be created, writable);
- the mesh shape against the devices; the rollouts per step against the batch shards and processes;
- the model files: the model family's ``input_problems`` (for SD3 / FLUX: the diffusers pipeline folder of
  ``model.path`` with its ``transformer/``, ``vae/`` (or ``model.vae_path``), ``text_encoder*/`` and
  ``tokenizer*/``);
- the prompt files (``data.train_prompts``, ``data.eval_prompts`` when evaluating), parsed;
- the reward: a known ``reward.name``, its required model paths given and every given path present;
- the logging settings (``log.wandb``: a known mode, wandb installed when set; a missing tensorboardX is
  not a problem: the trainer then writes no TensorBoard events and says so).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Any

import jax
import ml_collections

from awm_jax import config_lib, logging_wandb, parallel
from awm_jax.data import PromptFileError, load_dataset

__all__ = ["CheckError", "Inputs", "batch_problems", "check_run", "main", "report", "resolve_factory"]


class CheckError(RuntimeError):
    """Problems found by the pre-flight checks (``problems``: one message each, naming key and path)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = (f"{len(self.problems)} problems found before loading anything:\n"
                   + "\n".join(f"  - {p}" for p in self.problems))
        super().__init__(msg)


@dataclasses.dataclass
class Inputs:
    """What the checks read and the run reuses: the parsed prompt sets."""

    train_set: Any
    eval_set: Any = None


def resolve_factory(spec: str):
    """The ``"module:function"`` components factory of config key ``components``."""
    if ":" not in spec:
        raise config_lib.ConfigError(f"config key 'components' = {spec!r}: expected 'module:function'")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise config_lib.ConfigError(f"config key 'components' = {spec!r} cannot be imported: {e}") from e


def workdir_problem(workdir: str) -> str | None:
    """Why ``workdir`` cannot be the run's output directory (None: it can)."""
    if not workdir or not str(workdir).strip():
        return "--workdir is empty"
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"--workdir {workdir!r} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"--workdir {workdir!r} is not writable"
        return None
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--workdir {workdir!r} cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--workdir {workdir!r} cannot be created: {parent} is not writable"
    return None


def mesh_problem(config) -> str | None:
    """``mesh.data x mesh.fsdp x mesh.tensor`` must fit the devices (``parallel.make_mesh``'s rule) and not
    have all three axes > 1 (``parallel.config_mesh``'s rule: an XLA miscompile)."""
    try:
        parallel.config_mesh(config)
    except ValueError as e:
        return str(e)
    return None


def batch_problems(config) -> list[str]:
    """The step's rollouts against the batch shards (mesh data x fsdp) and the processes: every optimizer
    step's part over the batch shards, and (several processes) every rollout block over both (else the
    rollout or the train step fails after the model loads)."""
    mesh = parallel.config_mesh(config)
    shards, procs = parallel.num_batch_shards(mesh), jax.process_count()
    n = config.data.prompts_per_step * config.data.group_size
    block = config.sample.batch_size * jax.device_count()
    out = []
    sizes = sorted({min(block, n)} | ({n % block} if n % block else set()))
    for size in sizes:
        need = (("batch shards, mesh data x fsdp", shards if procs > 1 else 1), ("processes", procs))
        bad = [f"the {what} ({k})" for what, k in need if size % k]  # one process: rolled out unsharded
        if bad:
            out.append(f"config keys 'data.prompts_per_step' x 'data.group_size' = {n} rollouts per step in "
                       f"blocks of 'sample.batch_size' x {jax.device_count()} devices = {block}: a block of "
                       f"{size} does not split over {' and '.join(bad)}")
    part = n // max(1, config.train.steps_per_epoch)
    if n % max(1, config.train.steps_per_epoch) == 0 and part % shards:
        out.append(f"config keys 'data.prompts_per_step' x 'data.group_size' / 'train.steps_per_epoch' = "
                   f"{part} rollouts per optimizer step do not split over the {shards} batch shards (mesh "
                   "data x fsdp)")
    return out


def _prompts(which: str, spec: str, fmt: str, problems: list[str]):
    try:
        return load_dataset(spec, fmt)
    except PromptFileError as e:
        problems.append(f"config key 'data.{which}_prompts' = {spec!r}: {e}")
    return None


def check_run(config: ml_collections.ConfigDict, workdir: str) -> Inputs:
    """Run every pre-flight check; raise :class:`CheckError` listing every problem, else return the parsed
    prompt sets. Loads no model and writes nothing."""
    from awm_jax import rewards
    from awm_jax.models.family import get_family

    problems: list[str] = []
    valid = True
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        problems.extend(e.problems)
        valid = False
    try:
        resolve_factory(config.components)
    except config_lib.ConfigError as e:
        problems.append(str(e))
    mesh_bad = mesh_problem(config)
    for p in (workdir_problem(workdir), mesh_bad):
        if p:
            problems.append(p)
    if valid:
        problems.extend(get_family(config.model.kind).input_problems(config))
        if mesh_bad is None:
            problems.extend(batch_problems(config))
    train_set = _prompts("train", config.data.train_prompts, config.data.train_format, problems)
    eval_set = None
    if config.eval.every > 0 and config.data.eval_prompts:
        eval_set = _prompts("eval", config.data.eval_prompts, config.data.eval_format, problems)
    problems.extend(rewards.config_problems(config))
    problems.extend(logging_wandb.problems(config))
    if problems:
        raise CheckError(problems)
    return Inputs(train_set, eval_set)


def report(config: ml_collections.ConfigDict, workdir: str, config_path: str = "") -> int:
    """The checks as a command: ``ok: ...`` on stdout and 0, or ``error: ...`` (every problem) and 2."""
    try:
        inputs = check_run(config, workdir)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_eval = "no evaluation" if inputs.eval_set is None else f"{len(inputs.eval_set)} eval prompts"
    print(f"ok: {config_path or 'the config'} can start in {workdir} ({len(inputs.train_set)} train prompts, "
          f"{n_eval}; model {config.model.kind} {config.model.path or '(random init)'}, "
          f"reward {config.reward.name})")
    return 0


def main(argv=None) -> int:
    """``python -m awm_jax.check``: the trainer's arguments, the checks only; exit 0 (ok) or 2."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--check"]
    try:
        path, workdir, overrides = config_lib.parse_args(argv)
        config = config_lib.load_config(path)
        config_lib.apply_overrides(config, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return report(config, workdir, path)


if __name__ == "__main__":
    sys.exit(main())
