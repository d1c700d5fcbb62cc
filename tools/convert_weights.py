#!/usr/bin/env python
"""Convert model weights between diffusers folders and awm-jax Flax folders.

    python tools/convert_weights.py to-flax --model sd3 --src DIFFUSERS_DIR --dst FLAX_DIR
    python tools/convert_weights.py to-diffusers --model sd3 --src FLAX_DIR --dst DIFFUSERS_DIR

``--src`` may also be a full pipeline folder (the model's subfolder, e.g. ``transformer/``, is used).

    python tools/convert_weights.py export-lora --src LORA --dst PEFT_DIR [--base BASE] [--which W] [--step N]
    python tools/convert_weights.py to-diffusers --model sd3 --src BASE --dst DIR --merge-lora LORA

``LORA`` is a Flax LoRA folder or a trainer workdir (``config.json`` + ``checkpoints/``); for a workdir
``--which policy|eval_ema`` and ``--step N`` (default: newest) pick the adapter, and ``--base`` defaults to
the run's ``model.path``.
Models come from the registry in ``awm_jax.convert`` (``--model`` lists them). Errors print one line
and exit with status 2. New subcommands (e.g. ``--merge-lora``, ``export-lora``) register in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable

try:  # run as a script from a checkout without `pip install -e .`
    import awm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str) -> int:
    """``"2GB"`` / ``"500MiB"`` / ``"1000"`` -> bytes."""
    t = text.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            num = t[: -len(unit)].strip()
            break
    else:
        unit, num = "B", t
    try:
        value = int(float(num) * SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 2GB, 500MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    from awm_jax.convert import CONVERTERS

    p.add_argument("--model", required=True, help=f"model kind, one of {sorted(CONVERTERS)}")
    p.add_argument("--src", required=True, help="source folder (model or pipeline folder)")
    p.add_argument("--dst", required=True, help="destination folder (created)")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", help="max bytes per shard (2GB)")


def _run_to_flax(args: argparse.Namespace) -> str:
    from awm_jax.convert import to_flax

    return str(to_flax(args.src, args.dst, args.model, max_shard_bytes=args.max_shard_size))


def _run_to_diffusers(args: argparse.Namespace) -> str:
    from awm_jax.convert import to_diffusers

    if args.merge_lora:
        return str(_merged_to_diffusers(args))
    return str(to_diffusers(args.src, args.dst, args.model, max_shard_bytes=args.max_shard_size))


def _add_to_diffusers(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--merge-lora", default=None, metavar="CHECKPOINT",
                   help="Flax LoRA folder (lora_config.json + lora.safetensors) or trainer workdir, folded "
                        "into the base weights")
    _add_which(p)


def _add_which(p: argparse.ArgumentParser) -> None:
    from awm_jax.export import WHICH

    p.add_argument("--which", default="policy", choices=WHICH, help="trainer workdir: adapter to export")
    p.add_argument("--step", type=int, default=None, help="trainer workdir: checkpoint step (default newest)")


def _merged_to_diffusers(args: argparse.Namespace) -> pathlib.Path:
    """Base (diffusers or Flax folder) + LoRA folded in -> diffusers folder with a model card."""
    import tempfile

    from awm_jax.convert import read_flax_params, save_flax, to_diffusers
    from awm_jax.convert.lora_export import merge_lora, write_model_card
    from awm_jax.export import load_lora

    lora, info = load_lora(args.merge_lora, args.which, args.step)
    with tempfile.TemporaryDirectory() as tmp:
        config, _, tensors = read_flax_params(args.src, args.model)
        merged = merge_lora(dict(tensors), lora, int(info["rank"]), float(info["alpha"]))
        save_flax(merged, config, pathlib.Path(tmp) / "merged", args.model)
        out = to_diffusers(pathlib.Path(tmp) / "merged", args.dst, args.model,
                           max_shard_bytes=args.max_shard_size)
    write_model_card(out, {**info, "base_model": info.get("base_model", str(args.src))}, "merged weights")
    return pathlib.Path(out)


def _add_export_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="converter of the base transformer (sd3, flux); default: the LoRA's or the run's")
    p.add_argument("--base", default=None,
                   help="base model folder (diffusers or Flax) for its config; default: workdir model.path")
    p.add_argument("--src", required=True,
                   help="Flax LoRA folder (lora_config.json + lora.safetensors) or trainer workdir")
    p.add_argument("--dst", required=True, help="destination diffusers/peft LoRA folder (created)")
    _add_which(p)


def _run_export_lora(args: argparse.Namespace) -> str:
    from awm_jax.convert import folder_config
    from awm_jax.export import export_peft_lora, is_workdir

    model_config = None
    if args.base is None:
        if not is_workdir(args.src):
            raise ValueError(f"--src {args.src} is not a trainer workdir: give --base")
    else:
        model_config = {k: v for k, v in folder_config(args.base)[1].items() if k != "awm_jax"}
    return str(export_peft_lora(args.src, args.dst, model_config, args.which, args.step, model=args.model))


# name -> (help, add_arguments(parser), run(args) -> output path)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "to-flax": ("diffusers folder -> awm-jax Flax folder", _add_common, _run_to_flax),
    "to-diffusers": ("awm-jax Flax folder -> diffusers folder", _add_to_diffusers, _run_to_diffusers),
    "export-lora": ("Flax LoRA folder / trainer workdir -> diffusers/peft LoRA", _add_export_lora,
                    _run_export_lora),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the subcommand; known errors print one ``error: ...`` line and return 2."""
    from awm_jax.convert import ConversionError

    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        out = args.run(args)
    except (ConversionError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
