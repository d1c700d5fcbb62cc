"""FLOPs per image of the on-accelerator CLIP rewards (and, optionally, their wall time on this backend).

    python benchmarks/device_rewards.py [--size 512] [--time] [--batch 8] [--out FILE.md]

For each reward's real architecture (random weights are never materialised for the count: the models are
abstract) the whole jitted scoring program -- PIL-exact resize of a ``size`` x ``size`` uint8 image to 224,
crop, normalise, vision tower, text tower (77 tokens), projections, reward -- is traced and its matmul FLOPs
counted with ``awm_jax.flops.traced_flops`` (2 per multiply-add; the resize matmuls included). ``--time``
also builds random weights and times a batch on the default JAX backend (a loaded 2-core CPU here: that
figure is of this machine only).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (reward, architecture, CLIPConfig fields): ViT-H/14 (PickScore_v1, HPSv2.1), ViT-L/14 (aesthetic, CLIPScore)
H14 = dict(vision_hidden=1280, vision_intermediate=5120, vision_layers=32, vision_heads=16, image_size=224,
           patch_size=14, vision_act="gelu", text_hidden=1024, text_intermediate=4096, text_layers=24,
           text_heads=16, projection_dim=1024, text_act="gelu")
L14 = dict(vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=224,
           patch_size=14, text_hidden=768, text_intermediate=3072, text_layers=12, text_heads=12,
           projection_dim=768)
CASES = [("pickscore", "ViT-H/14", H14), ("hps", "ViT-H/14 (open_clip)", {**H14, "fused_qkv": True}),
         ("aesthetic", "ViT-L/14 + MLP head", L14), ("clipscore", "ViT-L/14", L14)]


def _scorer(kind: str, fields: dict, abstract: bool):
    import jax.numpy as jnp
    from flax import nnx

    from awm_jax.models import clip as fclip
    from awm_jax.rewards.clip_preprocess import PreprocessSpec
    from awm_jax.rewards.device_clip import DeviceCLIPScorer

    cfg = fclip.CLIPConfig(**fields)
    model = fclip.abstract_clip(cfg) if abstract else fclip.CLIPModel(cfg, rngs=nnx.Rngs(0))
    sizes = (cfg.projection_dim, 1024, 128, 64, 16, 1)
    head = [(jnp.zeros((a, b)), jnp.zeros((b,))) for a, b in zip(sizes[:-1], sizes[1:])]
    return DeviceCLIPScorer(model, PreprocessSpec(), object() if kind != "aesthetic" else None, kind,
                            head=head if kind == "aesthetic" else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="input image side (the trainer's resolution)")
    ap.add_argument("--time", action="store_true", help="also time a batch with random weights")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from awm_jax.flops import traced_flops

    rows = []
    for kind, arch, fields in CASES:
        s = _scorer(kind, fields, abstract=True)
        img = jax.ShapeDtypeStruct((1, args.size, args.size, 3), jnp.uint8)
        ids = jax.ShapeDtypeStruct((1, 77 if kind != "aesthetic" else 1), jnp.int32)
        head = None if s.head is None else [(jax.ShapeDtypeStruct(k.shape, k.dtype),
                                             jax.ShapeDtypeStruct(b.shape, b.dtype)) for k, b in s.head]
        gflops = traced_flops(s._fn, s.state, head, img, ids).flops / 1e9
        row = {"reward": kind, "arch": arch, "gflops": gflops}
        if args.time:
            s = _scorer(kind, fields, abstract=False)
            x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                                              dtype=np.uint8))
            ids = jnp.zeros((args.batch, ids.shape[1]), jnp.int32)
            jax.block_until_ready(s._fn(s.state, s.head, x, ids))
            t = time.perf_counter()
            jax.block_until_ready(s._fn(s.state, s.head, x, ids))
            row["s_per_image"] = (time.perf_counter() - t) / args.batch
        rows.append(row)
        print(row, flush=True)
    dev = jax.devices()[0]
    head_row = "| reward | architecture | GFLOP / image (matmul, counted) |"
    head_row += " s / image |" if args.time else ""
    lines = [f"# On-accelerator CLIP rewards: FLOPs per {args.size}x{args.size} image", "",
             f"Machine: {platform.node()}, JAX {jax.__version__}, backend {dev.platform} "
             f"({dev.device_kind}).",
             "", head_row,
             "|---|---|---|" + ("---|" if args.time else "")]
    for r in rows:
        t = f" {r['s_per_image']:.3f} |" if args.time else ""
        lines.append(f"| {r['reward']} | {r['arch']} | {r['gflops']:.1f} |{t}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
