"""Per-device parameter, LoRA and optimizer-state bytes of a model family's architecture on the shipped
meshes (abstract shapes); FLUX.1-dev by default, any family with ``--family`` (Z-Image, Qwen-Image, SD3.5).

Builds the architecture (``get_family(family).architecture(arch)``, e.g. ``flux.1-dev``) with
``nnx.eval_shape`` (no allocation, ``scan_layers=True``) with LoRA on the family's default targets and, for
each ``(data, fsdp, tensor)`` mesh,
sums every array's bytes divided by the product of the mesh axes its dimensions are sharded over, per
``awm_jax.parallel.logical_to_spec`` and ``LOGICAL_AXIS_RULES`` (a mesh stand-in with a ``.shape`` dict, so
meshes larger than this machine's device count can be planned). Writes a markdown table and the smallest
fsdp size per chip size to ``benchmarks/results/flux_memory_plan.md`` (other families:
``<family>_memory_plan.md``).

    python benchmarks/memory_plan.py [--family flux --arch flux.1-dev] [--rank 64] [--alpha 128] \
        [--headroom 0.3] [--out PATH]

Only weights and optimizer/EMA state are counted; activations, the text encoders, the VAE and XLA scratch
live in the headroom.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flax import nnx  # noqa: E402

from awm_jax.models.family import get_family  # noqa: E402
from awm_jax.models.lora import LoRAConfig, LoRAParam  # noqa: E402
from awm_jax.parallel import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_spec  # noqa: E402

MESHES = ((8, 1, 1), (1, 8, 1), (4, 2, 1), (2, 4, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8), (16, 1, 1),
          (1, 16, 1), (2, 8, 1), (1, 8, 2), (1, 32, 1), (1, 64, 1))
CHIPS = (("16 GB", 16e9), ("32 GB", 32e9), ("80 GB", 80e9), ("95 GB", 95e9))
DEFAULT_ARCH = {"flux": "flux.1-dev", "zimage": "z-image-turbo", "qwenimage": "qwen-image",
                "sd35": "sd3.5-medium"}
GB = 1e9
COLUMNS = (  # (row key, header)
    ("base_bf16", "base bf16"), ("base_fp32", "base fp32"), ("lora", "LoRA fp32"),
    ("adam_lora", "AdamW (LoRA)"), ("ema_lora", "kl+eval EMA (LoRA)"), ("total_lora", "LoRA total"),
    ("adam_full", "AdamW (full)"), ("ema_full", "kl+eval EMA (full)"), ("total_full", "full FT total"))


def _names(var) -> tuple | None:
    for k in ("out_sharding", "sharding_names", "sharding"):
        if var.has_metadata(k) and var.get_metadata(k) is not None:
            return tuple(var.get_metadata(k))
    return None


def abstract_shapes(config: Mapping, rank: int, alpha: float, targets: Sequence[str] | None = None,
                    family: str = "flux") -> tuple[dict, dict]:
    """``({path: shape}, {path: shape})`` of the base and LoRA parameters of ``family``'s model of diffusers
    config ``config``, plus their logical names in ``.names`` of each dict (built with ``nnx.eval_shape``,
    scanned stacks: nothing is allocated)."""
    fam = get_family(family)
    cfg = fam.config_from_dict(dict(config), source=f"{family} memory plan")
    lora = LoRAConfig(rank=int(rank), alpha=float(alpha), target_modules=tuple(targets or fam.lora_targets))
    model = nnx.eval_shape(lambda: fam.build(cfg, rngs=nnx.Rngs(0), scan_layers=True, lora=lora))
    out = ({}, {})
    names = ({}, {})
    for which, filt in enumerate((nnx.All(nnx.Param, nnx.Not(LoRAParam)), LoRAParam)):
        for path, var in nnx.to_flat_state(nnx.state(model, filt)):
            key = ".".join(map(str, path))
            out[which][key] = tuple(var.shape)
            names[which][key] = _names(var)
    return _Shapes(out[0], names[0]), _Shapes(out[1], names[1])


class _Shapes(dict):
    def __init__(self, shapes: dict, names: dict):
        super().__init__(shapes)
        self.names = names


def per_device_bytes(shapes: _Shapes, mesh: Sequence[int], itemsize: int) -> int:
    """Bytes of ``shapes`` on one device of mesh ``(data, fsdp, tensor)``: each array's bytes divided by the
    sizes of the mesh axes ``logical_to_spec`` shards its dimensions over (rounded up per array)."""
    like = SimpleNamespace(shape=dict(zip(MESH_AXES, map(int, mesh))))
    total = 0
    for key, shape in shapes.items():
        spec = logical_to_spec(shapes.names[key], shape, like, LOGICAL_AXIS_RULES)
        div = 1
        for entry in spec:
            for axis in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
                div *= like.shape[axis]
        total += math.ceil(math.prod(shape) * itemsize / div)
    return total


def memory_plan(config: Mapping, rank: int = 64, alpha: float = 128.0, meshes: Sequence = MESHES,
                targets: Sequence[str] | None = None, family: str = "flux") -> list[dict]:
    """One row per mesh: per-device bytes of the base (bf16 / fp32), the fp32 LoRA, AdamW (2x) and the
    kl-EMA + eval-EMA (2x) for LoRA and for full fine-tuning, and the totals (see :func:`markdown`)."""
    base, lora = abstract_shapes(config, rank, alpha, targets, family)
    rows = []
    for mesh in meshes:
        mesh = tuple(int(m) for m in mesh)
        r = dict(mesh=mesh, devices=math.prod(mesh), base_bf16=per_device_bytes(base, mesh, 2),
                 base_fp32=per_device_bytes(base, mesh, 4), lora=per_device_bytes(lora, mesh, 4))
        r["adam_lora"] = r["ema_lora"] = 2 * r["lora"]
        r["adam_full"] = r["ema_full"] = 2 * r["base_fp32"]
        # LoRA: frozen bf16 base + LoRA + its gradient + AdamW + two EMA adapters
        r["total_lora"] = r["base_bf16"] + r["lora"] * (1 + 1 + 2 + 2)
        # full FT: frozen bf16 reference + fp32 policy + its gradient + AdamW + two EMA copies
        r["total_full"] = r["base_bf16"] + r["base_fp32"] * (1 + 1 + 2 + 2)
        rows.append(r)
    counts = {"n_base": sum(math.prod(s) for s in base.values()),
              "n_lora": sum(math.prod(s) for s in lora.values())}
    for r in rows:
        r.update(counts)
    return rows


def fits(row: Mapping, mode: str, chip_bytes: float, headroom: float) -> bool:
    """Whether ``row``'s ``total_<mode>`` leaves a ``headroom`` fraction of the chip free for activations."""
    return row[f"total_{mode}"] <= (1.0 - headroom) * chip_bytes


def min_fsdp(rows: Sequence[Mapping], mode: str, chip_bytes: float, headroom: float):
    """The fitting mesh of smallest model-sharding degree fsdp x tensor (then fewest devices), or None."""
    ok = [r for r in rows if fits(r, mode, chip_bytes, headroom)]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["mesh"][1] * r["mesh"][2], r["mesh"][2], r["devices"]))["mesh"]


def _gb(b: float) -> str:
    return f"{b / GB:.2f}"


def markdown(rows: Sequence[Mapping], name: str, rank: int, alpha: float, headroom: float,
             command: str = "python benchmarks/memory_plan.py") -> str:
    """The results page: command, date, the sharding rule, the table (GB = 1e9 bytes) and the conclusions."""
    r0 = rows[0]
    lines = [
        f"# {name}: per-device weight and optimizer memory (abstract shapes)", "",
        f"Command: `{command}`  ", f"Date: {datetime.date.today().isoformat()}  ",
        f"Parameters: {r0['n_base'] / 1e9:.3f} B base, {r0['n_lora'] / 1e6:.1f} M LoRA (rank {rank}, alpha "
        f"{alpha:g}, the family's default targets).", "",
        "Rule: each parameter's bytes are divided by the product of the mesh axes its logical axis names map "
        "to under `awm_jax.parallel.LOGICAL_AXIS_RULES` (`embed` -> fsdp, `mlp`/`heads`/`vocab` -> tensor, "
        "`layers`, `kv`, `norm`, `lora_rank` replicated), exactly as `awm_jax.parallel.logical_to_spec` "
        "computes the PartitionSpec: a mesh axis is used once per array, and a dimension not divisible by "
        "its mesh axes is replicated. `data` never shards parameters.", "",
        "Columns (GB = 1e9 bytes, per device): frozen base in bf16 storage and in fp32; trainable LoRA "
        "(fp32); AdamW moments (2x trainable, fp32); kl-EMA + eval-EMA (2x trainable, fp32). "
        "**LoRA total** = bf16 base + LoRA + its fp32 gradient + AdamW + 2 EMAs = base_bf16 + 6 x LoRA. "
        "**full FT total** = bf16 frozen reference + fp32 policy + fp32 gradient + AdamW + 2 EMAs = "
        "base_bf16 + 6 x base_fp32 (with `model.param_dtype = float32`, the reference is fp32: add "
        "base_fp32 - base_bf16).", "",
        "| mesh (data, fsdp, tensor) | devices | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * (2 + len(COLUMNS)),
    ]
    for r in rows:
        lines.append(f"| {r['mesh']} | {r['devices']} | " + " | ".join(_gb(r[k]) for k, _ in COLUMNS) + " |")
    lines += ["", f"## Smallest model-sharding mesh that fits, {headroom:.0%} of the chip kept for "
              "activations / XLA scratch", "",
              f"| chip | LoRA (r={rank}) | full fine-tuning |", "|---|---|---|"]
    for chip, size in CHIPS:
        cells = []
        for mode in ("lora", "full"):
            m = min_fsdp(rows, mode, size, headroom)
            if m is None:
                most = max(r["mesh"][1] * r["mesh"][2] for r in rows)
                cells.append(f"none of the planned meshes (needs > {most}-way model sharding)")
            else:
                row = next(r for r in rows if r["mesh"] == m)
                cells.append(f"fsdp x tensor = {m[1] * m[2]} e.g. {m}: {_gb(row[f'total_{mode}'])} GB")
        lines.append(f"| {chip} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="flux", choices=sorted(DEFAULT_ARCH), help="model family")
    p.add_argument("--arch", default=None, help="the family's architecture name (default: its full-size one)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--headroom", type=float, default=0.3, help="fraction of the chip kept for activations")
    p.add_argument("--out", default=None, help="default benchmarks/results/<family>_memory_plan.md")
    args = p.parse_args(argv)
    args.arch = args.arch or DEFAULT_ARCH[args.family]
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"{args.family}_memory_plan.md")
    t0 = time.perf_counter()
    rows = memory_plan(get_family(args.family).architecture(args.arch), args.rank, args.alpha,
                       family=args.family)
    cmd = "python benchmarks/memory_plan.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                     " " + " ".join(sys.argv[1:] if argv is None else argv))
    text = markdown(rows, args.arch, args.rank, args.alpha, args.headroom, command=cmd.strip())
    print(text)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
