"""Config loading, command-line overrides and validation for the trainer.

Config files are Python files with a ``get_config()`` returning an ``ml_collections.ConfigDict``
(see ``configs/``). Overrides use dotted keys: ``--config.optim.lr=1e-4`` or ``--config.optim.lr 1e-4``.
An unknown key stops with an error naming it and the closest valid key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

import ml_collections

__all__ = [
    "ConfigError",
    "load_config",
    "apply_overrides",
    "validate",
    "save_config",
    "parse_args",
    "flat_keys",
    "transformer_config",
]

def transformer_config(cfg: ml_collections.ConfigDict) -> dict:
    """The diffusers transformer config dict named by ``model.arch`` in the family ``model.kind``."""
    from awm_jax.models.family import get_family

    try:
        return get_family(cfg.model.kind).architecture(cfg.model.arch)
    except KeyError as e:
        raise ConfigError(f"config key 'model.arch' = {cfg.model.arch!r}: {e.args[0]}") from None


class ConfigError(ValueError):
    """A config file, key or value is invalid (``problems``: one message each, when several)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def load_config(path: str) -> ml_collections.ConfigDict:
    """Import the config file at ``path`` and return its ``get_config()`` (unlocked copy).

    The file's directory is put on ``sys.path`` while it loads, so config files can share a base
    module living beside them (``configs/awm_base.py``).
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    name = "_awm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    cfg_dir = os.path.dirname(path)
    sys.path.insert(0, cfg_dir)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} defines no get_config()")
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the file: one line naming file and line
        raise ConfigError(_import_failure(path, e)) from None
    finally:
        sys.path.remove(cfg_dir)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected ConfigDict")
    return cfg


def _import_failure(path: str, e: BaseException) -> str:
    """``config file PATH, line N: Type: message`` for a config file that does not import (the line: the
    syntax error's, else the deepest frame of the traceback in a file of the config's folder)."""
    import traceback

    where, line = path, None
    if isinstance(e, SyntaxError) and e.filename:
        where, line = e.filename, e.lineno
        msg = f"SyntaxError: {e.msg}"
    else:
        folder = os.path.dirname(path)
        for frame in traceback.extract_tb(e.__traceback__):
            if frame.filename and os.path.dirname(os.path.abspath(frame.filename)) == folder:
                where, line = frame.filename, frame.lineno
        msg = f"{type(e).__name__}: {' '.join(str(e).split())}"
    at = f", line {line}" if line else ""
    shown = path if where == path else f"{path} (in {where})"
    return f"config file {shown}{at} does not import: {msg}"


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys (and section keys) of ``cfg``."""
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(flat_keys(v, key + "."))
    return out


def _unknown_key(cfg, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, flat_keys(cfg), n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _parse_free(text: str):
    """A value without a declared type (``reward.kwargs.*``): JSON (numbers, booleans, lists), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_value(key: str, text: str, old):
    """Parse ``text`` to the type of the existing value ``old``."""
    if isinstance(old, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected a boolean, got '{text}'")
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
            raise ConfigError(f"config key '{key}': expected an int, got '{text}'") from None
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key '{key}': expected a float, got '{text}'") from None
    if isinstance(old, str):
        return text
    if isinstance(old, (tuple, list)):
        try:
            val = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            val = tuple(s.strip() for s in text.split(",") if s.strip())
        if not isinstance(val, (tuple, list)):
            val = (val,)
        return type(old)(val)
    # None or other: best-effort Python literal, else the raw string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]):
    """Apply ``(dotted_key, text_value)`` overrides in place; unknown keys raise ``ConfigError``."""
    for key, text in overrides:
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise _unknown_key(cfg, key)
            node = node[p]
        leaf = parts[-1]
        if leaf not in node and parts[:-1] == ["reward", "kwargs"]:  # free keywords of any reward
            node[leaf] = _parse_free(text)
            continue
        if leaf not in node:
            raise _unknown_key(cfg, key)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"config key '{key}' is a section; set one of its fields instead")
        with node.ignore_type():
            node[leaf] = _parse_value(key, text, node[leaf])
    return cfg


USAGE = """usage: python -m awm_jax.train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

  --config PATH         a config file defining get_config() (see configs/; every key is documented
                        in configs/awm_base.py)
  --workdir DIR         outputs: config.json, metrics.jsonl, eval.jsonl, tb/, samples/, checkpoints/;
                        an existing workdir is resumed from its latest checkpoint
  --config.KEY=VALUE    override any config key, e.g. --config.max_steps=4 --config.optim.lr=1e-4
  --fresh               = --config.checkpoint.allow_fresh_start=true: when every checkpoint in the workdir is
                        unusable, start again from step 0 (bad checkpoints kept as <step>.corrupt, old logs as
                        *.jsonl.before-fresh) instead of stopping with an error
  --allow-config-change = --config.checkpoint.allow_config_change=true: resume with config changes that
                        keep the saved state's meaning (learning rate, prompts per step, ...), recorded in
                        config_history.jsonl; changes of the algorithm, model or LoRA shape are always refused
  --coordinator_address HOST:PORT --num_processes N --process_id I
                        a manual multi-host launch (jax.distributed.initialize; docs/multihost.md); on a TPU
                        pod or under SLURM the cluster is detected and these are not needed
"""

FRESH_FLAG = "--fresh"
FRESH_KEY = "checkpoint.allow_fresh_start"
ALLOW_CHANGE_FLAG = "--allow-config-change"
ALLOW_CHANGE_KEY = "checkpoint.allow_config_change"


def parse_args(argv: Sequence[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """Parse ``--config PATH --workdir DIR [--fresh] [--config.a.b=V | --config.a.b V ...]``.

    Returns ``(config_path, workdir, overrides)``; ``--fresh`` is the override
    ``checkpoint.allow_fresh_start=true``.
    """
    config_path = workdir = None
    overrides: list[tuple[str, str]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == FRESH_FLAG:
            overrides.append((FRESH_KEY, "true"))
            i += 1
            continue
        if arg == ALLOW_CHANGE_FLAG:
            overrides.append((ALLOW_CHANGE_KEY, "true"))
            i += 1
            continue
        if "=" in arg:
            name, value = arg.split("=", 1)
            consumed = 1
        else:
            name = arg
            if i + 1 >= len(argv):
                raise ConfigError(f"argument {arg} needs a value")
            value = argv[i + 1]
            consumed = 2
        if name == "--config":
            config_path = value
        elif name == "--workdir":
            workdir = value
        elif name.startswith("--config."):
            overrides.append((name[len("--config."):], value))
        else:
            raise ConfigError(f"unknown argument '{arg}' (expected --config, --workdir, --fresh, "
                              "--allow-config-change, --config.KEY=VALUE)")
        i += consumed
    if config_path is None:
        raise ConfigError("missing --config PATH")
    if workdir is None:
        raise ConfigError("missing --workdir DIR")
    return config_path, workdir, overrides


_CHOICES = {
    "algorithm": None,  # validate(): awm_jax.rl.registry.all_names() (deprecated aliases included)
    "model.remat_policy": ("none", "full", "dots_saveable", "nothing_saveable", "save_attention"),
    "model.attention": ("auto", "xla", "splash", "cudnn"),
    "sample.sampler": ("sa_solver", "euler_maruyama", "ode", "sde", "cps", "dpm2"),
    "awm.timestep_sampler": ("discrete", "discrete_wo_init", "uniform", "logit_normal", "permutation"),
    "advantages.mode": ("standard", "exact"),
    "elbo.likelihood": ("adaptive", "exact", "uniform", "t"),
    "awm.weighting": ("uniform", "t", "t2", "ghuber", "elbo"),
    "awm.loss_type": ("per_time", "mean_over_times"),
    "advantages.std_mode": ("global", "group"),
    "data.train_format": ("text", "geneval", "ocr"),
    "data.eval_format": ("text", "geneval", "ocr"),
    "eval.on_error": ("raise", "continue"),
}
_POSITIVE = (
    "data.group_size", "data.prompts_per_step", "max_steps", "sample.num_steps", "eval.num_steps",
    "checkpoint.keep", "train.max_nonfinite", "train.micro_batch_size", "sample.batch_size",
    "checkpoint.every", "train.steps_per_epoch",
)


def _get(cfg, key):
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check enumerations, positivity and cross-field constraints; raise ``ConfigError`` naming the key of
    EVERY problem (:func:`config_problems`; ``.problems`` lists them)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems), problems)


def config_problems(cfg: ml_collections.ConfigDict) -> list[str]:
    """Every problem of the config values alone (no files, no devices), each naming its key."""
    from awm_jax.models.family import family_names
    from awm_jax.rl import registry

    problems: list[str] = []
    kinds = tuple(family_names())
    kind = cfg.get("model", {}).get("kind")
    if kind not in kinds:
        problems.append(f"config key 'model.kind' = {kind!r} is not one of {kinds}")
    for key, choices in _CHOICES.items():
        try:
            val = _get(cfg, key)
        except KeyError:
            problems.append(f"config is missing required key '{key}'")
            continue
        choices = registry.all_names() if choices is None else choices
        if val not in choices:
            problems.append(f"config key '{key}' = {val!r} is not one of {choices}")
    for key in _POSITIVE:
        try:
            val = _get(cfg, key)
        except KeyError:
            problems.append(f"config is missing required key '{key}'")
            continue
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            problems.append(f"config key '{key}' must be a positive int, got {val!r}")
    if any("missing required key" in p for p in problems):  # the cross-field checks below read these keys
        return problems
    checks = (
        (cfg.sample.noise_level < 0,
         f"config key 'sample.noise_level' must be >= 0, got {cfg.sample.noise_level}"),
        (cfg.awm.train_timesteps <= 0,
         f"config key 'awm.train_timesteps' must be > 0, got {cfg.awm.train_timesteps}"),
        (cfg.optim.lr <= 0, f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}"),
        (cfg.algorithm == "flow_grpo" and cfg.sample.sampler not in ("sde", "cps"),
         f"config key 'sample.sampler' = {cfg.sample.sampler!r}: flow_grpo needs a per-step likelihood "
         "sampler ('sde' or 'cps')"),
        (cfg.model.text_cache_mb < 0,
         f"config key 'model.text_cache_mb' must be >= 0, got {cfg.model.text_cache_mb}"),
        (cfg.algorithm == "nft" and not cfg.nft.beta > 0,
         f"config key 'nft.beta' must be > 0, got {cfg.nft.beta}"),
        (cfg.train.scan_times and cfg.algorithm in registry.all_names()
         and registry.get(cfg.algorithm).needs_all_times,
         f"config key 'train.scan_times' = True: {cfg.algorithm}'s ratio needs all K times at once"),
        (cfg.train.scan_times and cfg.awm.loss_type != "per_time",
         "config key 'train.scan_times' = True needs awm.loss_type = 'per_time'"),
        (cfg.lora.rank <= 0 and not cfg.lora.full_finetune,
         f"config key 'lora.rank' must be > 0, got {cfg.lora.rank}"),
        (cfg.data.group_size < 2,
         f"config key 'data.group_size' = {cfg.data.group_size}: every objective ({cfg.algorithm!r} "
         "included) normalises rewards within the group of images of one prompt (advantage = reward - group "
         "mean), so a group of 1 has advantage 0 and trains nothing; use >= 2"),
        (cfg.eval.every < 0, f"config key 'eval.every' must be >= 0 (0 = never), got {cfg.eval.every}"),
        (cfg.reward.timeout_s < 0, f"config key 'reward.timeout_s' must be >= 0 (0 = no limit), got "
         f"{cfg.reward.timeout_s}"),
    )
    problems.extend(msg for bad, msg in checks if bad)
    problems.extend(_schedule_problems(cfg))
    from awm_jax.rl.selection import config_problems as select_problems  # rollout selection's select.*

    problems.extend(select_problems(cfg))
    n = cfg.data.prompts_per_step * cfg.data.group_size
    if cfg.train.steps_per_epoch > 0 and n % cfg.train.steps_per_epoch:
        problems.append(f"config key 'train.steps_per_epoch' = {cfg.train.steps_per_epoch} does not divide "
                        f"the {n} rollouts of a step (data.prompts_per_step x data.group_size)")
    return problems


def _schedule_problems(cfg) -> list[str]:
    """Rollout step counts against the training-time strata (what the train step would reject after the
    model loads)."""
    if cfg.algorithm == "flow_grpo":
        frac = float(cfg.flow_grpo.timestep_fraction)
        if int(cfg.sample.num_steps * frac) < 1:
            return [f"config keys 'sample.num_steps' = {cfg.sample.num_steps}, 'flow_grpo.timestep_fraction'"
                    f" = {frac}: int(num_steps x fraction) = {int(cfg.sample.num_steps * frac)}, no sampling "
                    "step to train"]
        return []
    w = cfg.awm
    if w.timestep_sampler not in ("discrete", "discrete_wo_init"):
        return []
    top, start = int(cfg.sample.num_steps * float(w.timestep_fraction)), int(w.timestep_sampler != "discrete")
    if top <= start:
        return [f"config keys 'sample.num_steps' = {cfg.sample.num_steps}, 'awm.timestep_fraction' = "
                f"{w.timestep_fraction}: awm.timestep_sampler {w.timestep_sampler!r} draws training times "
                f"from grid indices [{start}, int(num_steps x fraction) = {top}), which is empty; raise "
                "sample.num_steps"]
    return []


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Write the resolved config to ``workdir/config.json`` (and a readable ``config.txt``)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(workdir, "config.txt"), "w") as f:
        f.write(str(cfg))
    return path
