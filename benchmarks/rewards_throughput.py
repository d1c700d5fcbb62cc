"""Reward scorer throughput on this machine, the bridge's overhead, and pure_callback vs host step.

    python benchmarks/rewards_throughput.py [--quick] [--no-clip-l] [--out benchmarks/results/rewards.md]
    python benchmarks/rewards_throughput.py --workers 2 [--out benchmarks/results/rewards_pool.md]

Measures images/s per scorer (OCR for real on 512x512 rendered text; JPEG; PickScore, aesthetic
and GenEval with tiny random models and, unless --no-clip-l, PickScore/aesthetic with a random
CLIP-L-shaped model), the RewardBridge overhead against calling the scorer directly, and a
rollout+reward loop done three ways (jax.pure_callback inside the jitted rollout, serial host
step, host step overlapped with the next rollout via RewardBridge.submit). Offline: every model is
random and built locally.

``--workers W`` measures only the worker pool (``awm_jax.rewards.pool``): images/s of the LAION aesthetic
scorer with a random CLIP-L/14 vision tower (224 px, 24 layers, width 1024; a 2-layer text tower it does not
use) in one process (1 thread: the core-seconds per image; all cores as threads) against ``W`` worker
processes splitting each batch (cores // W threads each).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
TEXTS = ["Spring Collection 2024", "Step Goal Achieved", "Forever Yours", "Try Our New Burger",
         "Lost City Near", "Fresh Bakery Daily", "Welcome Home", "Open 24 Hours"]


def render(text: str, size: int = 512) -> np.ndarray:
    """Black text on white, font shrunk until the line fits."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for fs in range(56, 11, -2):
        font = ImageFont.truetype(FONT, fs) if os.path.exists(FONT) else ImageFont.load_default(size=fs)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        if x1 - x0 <= size - 40:
            break
    draw.text(((size - (x1 - x0)) // 2 - x0, (size - (y1 - y0)) // 2 - y0), text, fill="black", font=font)
    return np.asarray(img)


def timeit(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def machine() -> str:
    import jax
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), "
            f"jax {jax.__version__} ({jax.devices()[0].platform}), load average {load[0]:.1f} "
            f"(shared with other jobs: numbers are noisy)")


def bench_scorers(tmp: str, quick: bool, clip_l: bool) -> list[tuple[str, str, float]]:
    from awm_jax.rewards import get
    from awm_jax.rewards.tiny import (
        save_tiny_aesthetic,
        save_tiny_clip,
        save_tiny_detr,
        save_tiny_mask2former,
    )

    rows = []
    b = 4 if quick else 8
    texts = (TEXTS * 2)[:b]
    ocr_imgs = np.stack([render(t) for t in texts])
    ocr_prompts = [f'a sign that says "{t}"' for t in texts]
    rand = np.random.default_rng(0).integers(0, 256, (b, 512, 512, 3), dtype=np.uint8)
    reps = 1 if quick else 2

    for label, kw in (("ocr (rapidocr, det 736/min = default)", {}),
                      ("ocr (rapidocr, det 512/max)", {"det_limit_side_len": 512, "det_limit_type": "max"})):
        s = get("ocr", **kw)
        r = s(ocr_imgs, ocr_prompts)
        t = timeit(lambda s=s: s(ocr_imgs, ocr_prompts), reps)
        rows.append((label, f"512x512, B={b}, mean reward {r.mean():.3f}", b / t))
    for name in ("jpeg_compressibility",):
        s = get(name)
        rows.append((name, f"512x512 random, B={b}", b / timeit(lambda s=s: s(rand, ["x"] * b), reps + 2)))

    clip = save_tiny_clip(os.path.join(tmp, "clip"))
    head = save_tiny_aesthetic(os.path.join(tmp, "head.safetensors"), dim=16)
    det = save_tiny_detr(os.path.join(tmp, "detr"))
    m2f = save_tiny_mask2former(os.path.join(tmp, "m2f"))
    prompts = ["a photo of a dog"] * b
    s = get("pickscore", model_path=clip)
    t = timeit(lambda: s(rand, prompts), reps)
    rows.append(("pickscore (tiny random CLIP, 32 px)", f"512x512 input, B={b}", b / t))
    s = get("aesthetic", clip_path=clip, head_path=head)
    t = timeit(lambda: s(rand, prompts), reps)
    rows.append(("aesthetic (tiny random CLIP, 32 px)", f"512x512 input, B={b}", b / t))
    meta = [{"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                              {"class": "cat", "count": 1, "color": "blue"}]}] * b
    for label, path in (("geneval (tiny random DETR + CLIP, 64 px)", det),
                        ("geneval (tiny random Mask2Former + CLIP, 64 px)", m2f)):
        s = get("geneval", detector_path=path, clip_path=clip, threshold=0.0)
        t = timeit(lambda s=s: s(rand, prompts, meta), reps)
        rows.append((label, f"512x512 input, B={b}, threshold 0", b / t))

    if clip_l:
        import torch
        from transformers import CLIPConfig, CLIPModel

        from awm_jax.rewards.tiny import _byte_vocab

        vocab = _byte_vocab()
        proc_dir = save_tiny_clip(os.path.join(tmp, "clip224"), image_size=224, patch=14)
        cfg = CLIPConfig(
            text_config=dict(vocab_size=len(vocab), hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                             bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                             pad_token_id=vocab["<|endoftext|>"]),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14),
            projection_dim=768)
        torch.manual_seed(0)
        big = CLIPModel(cfg).eval()
        bl = 2 if quick else 4
        s = get("pickscore", model_path=proc_dir)
        s.model = big  # random CLIP-L-shaped weights (the processor of proc_dir is 224 px)
        t = timeit(lambda: s(rand[:bl], prompts[:bl]), 1)
        rows.append(("pickscore (random CLIP-L shape, 224 px)", f"512x512 input, B={bl}", bl / t))
        from awm_jax.rewards.aesthetic import load_head

        s = get("aesthetic", clip_path=proc_dir, head_path=head)
        s.model = big  # the matching 768-wide head replaces the tiny one
        s.head = load_head(save_tiny_aesthetic(os.path.join(tmp, "h768.safetensors"), 768), 768)
        t = timeit(lambda: s(rand[:bl], prompts[:bl]), 1)
        rows.append(("aesthetic (random CLIP-L shape + 768 head, 224 px)", f"512x512 input, B={bl}", bl / t))
    return rows


def bench_bridge(quick: bool) -> list[tuple[str, float]]:
    """ms per batch: scorer direct vs bridge.score vs bridge.submit().result()."""
    from awm_jax.rewards import get
    from awm_jax.rewards.bridge import RewardBridge

    imgs = np.random.default_rng(1).integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    prompts = ["x"] * 8
    s = get("jpeg_compressibility")
    reps = 5 if quick else 20
    out = [("jpeg scorer called directly (8 x 256x256)", 1e3 * timeit(lambda: s(imgs, prompts), reps))]
    with RewardBridge(s, name="jpeg") as bridge:
        out.append(("RewardBridge.score", 1e3 * timeit(lambda: bridge.score(imgs, prompts), reps)))
        t = timeit(lambda: bridge.submit(imgs, prompts).result(), reps)
        out.append(("RewardBridge.submit(...).result()", 1e3 * t))
        import jax.numpy as jnp

        x = jnp.asarray(imgs)
        t = timeit(lambda: bridge.score(x, prompts), reps)
        out.append(("RewardBridge.score on a jax.Array", 1e3 * t))
    return out


def _callback_case(label, scorer, rollout, keys, b, quick):
    """One scorer: ms per batch for the three ways of combining rollout and reward."""
    import jax
    import jax.numpy as jnp

    from awm_jax.rewards.bridge import RewardBridge

    prompts = ["x"] * b

    def host_cb(imgs):
        return np.asarray(scorer(np.asarray(imgs), prompts, None), np.float32)

    @jax.jit
    def fused(key):
        imgs = rollout(key)
        return imgs, jax.pure_callback(host_cb, jax.ShapeDtypeStruct((b,), jnp.float32), imgs)

    def run_callback():
        for k in keys:
            jax.block_until_ready(fused(k)[1])

    def run_serial():
        bridge = RewardBridge(scorer)
        for k in keys:
            bridge.score(rollout(k), prompts)

    def run_overlap():
        with RewardBridge(scorer) as bridge:
            pending = None
            for k in keys:
                imgs = rollout(k)  # dispatched asynchronously
                if pending is not None:
                    pending.result()
                pending = bridge.submit(imgs, prompts)
            pending.result()

    t_roll = timeit(lambda: rollout(keys[0]).block_until_ready(), 3)
    host_imgs = np.asarray(rollout(keys[0]))
    t_score = timeit(lambda: scorer(host_imgs, prompts, None), 3)
    out = []
    for name, fn in (("pure_callback inside jit", run_callback), ("host step, serial", run_serial),
                     ("host step, overlapped (submit)", run_overlap)):
        out.append((label, name, 1e3 * timeit(fn, 2 if quick else 3) / len(keys)))
    out.append((label, f"reference: rollout alone {1e3 * t_roll:.0f} ms, scorer alone {1e3 * t_score:.0f} ms",
                None))
    return out


def bench_callback(quick: bool) -> list[tuple[str, str, float | None]]:
    """Rollout + reward per batch: pure_callback inside jit vs host step (serial / overlapped)."""
    import jax
    import jax.numpy as jnp

    from awm_jax.rewards import get

    b, n_batches = 8, (3 if quick else 6)
    w = jax.random.normal(jax.random.key(0), (128, 128)) / 12

    @jax.jit
    def rollout(key):
        x = jax.random.normal(key, (b, 128, 128, 3))
        x = jax.lax.fori_loop(0, 10, lambda _, x: jnp.tanh(jnp.einsum("bhwc,wv->bhvc", x, w)), x)
        return ((x + 1) * 127.5).astype(jnp.uint8)

    def slow_server(images, prompts, metadata):  # a remote / accelerator scorer: latency, idle host
        time.sleep(0.15)
        return np.zeros(len(prompts), np.float32)

    keys = list(jax.random.split(jax.random.key(1), n_batches))
    out = _callback_case("jpeg (host CPU)", get("jpeg_compressibility"), rollout, keys, b, quick)
    out += _callback_case("remote-server-like scorer (150 ms latency)", slow_server, rollout, keys, b, quick)
    return out


def save_clip_l_vision(path: str) -> str:
    """A random CLIP-L/14 vision tower (+ projection 768; a tiny text tower) and a 224 px processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from awm_jax.rewards.tiny import _byte_vocab, save_tiny_clip

    save_tiny_clip(path, image_size=224, patch=14)  # the processor files (and a model overwritten below)
    vocab = _byte_vocab()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(path)
    return path


def bench_pool(tmp: str, workers: int, quick: bool, scorer: str = "aesthetic"):
    """``(setup, processes, threads each, images/s, core-seconds per image)`` of ``scorer``: the random
    CLIP-L aesthetic, or the real RapidOCR on rendered text (``ocr``)."""
    import torch

    from awm_jax.rewards import get
    from awm_jax.rewards.pool import ScorerPool
    from awm_jax.rewards.tiny import save_tiny_aesthetic

    cores = os.cpu_count() or 1
    b = max(workers, 4 if quick else 8)
    if scorer == "ocr":
        texts = (TEXTS * 2)[:b]
        imgs = np.stack([render(t) for t in texts])
        prompts = [f'a sign that says "{t}"' for t in texts]
        kw: dict = {}
    else:
        kw = {"clip_path": save_clip_l_vision(os.path.join(tmp, "clip-l")),
              "head_path": save_tiny_aesthetic(os.path.join(tmp, "head768.safetensors"), dim=768),
              "batch_size": 8}
        imgs = np.random.default_rng(0).integers(0, 256, (b, 512, 512, 3), dtype=np.uint8)
        prompts = ["a photo"] * b
    reps = 1 if quick else 2
    rows = []
    want = None
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        s = get(scorer, **kw, **({"intra_op_num_threads": threads} if scorer == "ocr" else {}))
        want = s(imgs, prompts)  # warm-up
        ips = b / timeit(lambda s=s: s(imgs, prompts), reps, warmup=0)
        rows.append(("in-process", 1, threads, ips, threads / ips))
        del s
    threads = max(1, cores // workers)
    with ScorerPool(scorer, workers=workers, threads=threads, **kw) as pool:
        got = pool(imgs, prompts)  # warm-up, and the pool's rewards equal the in-process ones
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5), (got, want)
        ips = b / timeit(lambda: pool(imgs, prompts), reps, warmup=0)
    rows.append(("pool (awm_jax.rewards.pool)", workers, threads, ips, workers * threads / ips))
    return rows


def _cpu_per_image(fn, b: int) -> float:
    """CPU seconds of this process per image of one ``fn()`` call on ``b`` images, after a warm-up call:
    with one thread this is the vCPU-seconds per image, independent of how loaded the machine is."""
    fn()
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) / b


def bench_cost(tmp: str, quick: bool) -> list[tuple[str, str, float]]:
    """vCPU-seconds per image, one thread, of the real architectures (random weights; OCR's real ONNX)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from awm_jax.rewards import get
    from awm_jax.rewards.tiny import _byte_vocab, save_tiny_aesthetic, save_tiny_clip

    torch.set_num_threads(1)
    b = 2 if quick else 4
    rand = np.random.default_rng(0).integers(0, 256, (b, 512, 512, 3), dtype=np.uint8)
    prompts = ["a photo of a dog on the grass"] * b
    rows = []
    s = get("jpeg_compressibility")
    rows.append(("jpeg_compressibility", "PIL JPEG, q 95", _cpu_per_image(lambda s=s: s(rand, prompts), b)))
    texts = (TEXTS * 2)[:b]
    signs = np.stack([render(t) for t in texts])
    s = get("ocr", intra_op_num_threads=1)
    rows.append(("ocr", "RapidOCR det 736/min + rec, real ONNX models, rendered signs",
                 _cpu_per_image(lambda s=s: s(signs, [f'"{t}"' for t in texts]), b)))
    head = save_tiny_aesthetic(os.path.join(tmp, "h768.safetensors"), dim=768)
    s = get("aesthetic", clip_path=save_clip_l_vision(os.path.join(tmp, "clip-l")), head_path=head)
    rows.append(("aesthetic / CLIP-L/14 image", "random CLIP-L/14 vision tower, 224 px",
                 _cpu_per_image(lambda s=s: s(rand, prompts), b)))
    vocab = _byte_vocab()
    proc = save_tiny_clip(os.path.join(tmp, "clip224"), image_size=224, patch=14)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=1024)
    s = get("pickscore", model_path=proc)
    torch.manual_seed(0)
    s.model = CLIPModel(cfg).eval()  # random CLIP-H/14 (PickScore's architecture), text tokens byte-level
    rows.append(("pickscore / CLIP-H/14 image + text", "random CLIP-H/14, 224 px, byte-level prompt tokens",
                 _cpu_per_image(lambda s=s: s(rand, prompts), b)))
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    swin = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    det = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=swin, num_labels=80)).eval()
    improc = Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333})

    def detect():
        with torch.inference_mode():
            det(**improc(images=list(rand[:2]), return_tensors="pt"))

    rows.append(("geneval detector / Mask2Former Swin-S", "random weights, 800 px (the processor's default)",
                 _cpu_per_image(detect, 2)))
    return rows


def cost_report(rows, quick: bool) -> str:
    lines = ["# Reward scorer cost: vCPU-seconds per image, one thread", "", f"Machine: {machine()}.", "",
             f"Command: `python benchmarks/rewards_throughput.py --cost{' --quick' if quick else ''}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). CPU time of the process "
             "(`time.process_time`) with torch / onnxruntime at one thread, 512x512 inputs, after a warm-up "
             "call: load-independent, unlike wall time on this shared VM.", "",
             "| scorer / architecture | how | vCPU-s / image |", "|---|---|---|"]
    lines += [f"| {n} | {h} | {v:.3g} |" for n, h, v in rows]
    return "\n".join(lines) + "\n"


def pool_report(rows, workers: int, quick: bool, scorer: str = "aesthetic") -> str:
    base = rows[-2][3]  # in-process with every core as threads
    lines = ["# Reward worker pool: images/s, one process vs worker processes", "",
             f"Machine: {machine()}.", "",
             f"Command: `python benchmarks/rewards_throughput.py --workers {workers}"
             f"{' --quick' if quick else ''} --pool-scorer {scorer}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Scorer: "
             + ("RapidOCR (real ONNX models, onnxruntime intra-op threads) on 512x512 rendered text"
                if scorer == "ocr" else "LAION aesthetic, random CLIP-L/14 vision tower at 224 px + a "
                "768-wide head, 512x512 inputs") + ", one batch per call.", "",
             "| setup | processes | torch threads each | images/s | core-seconds / image "
             "| vs in-process, all cores |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {p} | {t} | {ips:.3f} | {cs:.2f} | {ips / base:.2f}x |" for n, p, t, ips, cs in rows]
    return "\n".join(lines) + "\n"


NOTES = """
## Notes

- The machine is shared by several jobs (see the load average above), so absolute numbers are
  pessimistic and noisy by tens of percent; compare rows of one run only.
- OCR is the real rapidocr engine on rendered text (mean reward 1.0 = every target read). Its
  detector resizes the short side to 736 by default (upsampling 512 px images); `det_limit_type="max"`
  with 512 keeps the size and is faster at equal accuracy on this text.
- Tiny random models measure plumbing (processor, PIL crops, Python loops), not model cost; the
  random CLIP-L-shaped rows give the order of magnitude of the real PickScore / aesthetic CLIP
  on this CPU (PickScore's real CLIP-H is about 3x the FLOPs of CLIP-L).
- Bridge overhead: `RewardBridge.score` against the direct call is within the run-to-run noise
  (a few ms per batch here); the bridge adds one host copy, input checks, a finiteness check and,
  for `submit`, a thread hand-off.
- pure_callback vs host step: a `jax.pure_callback` runs the scorer inside the jitted program, so
  the next rollout cannot start until scoring ends (cost ~ rollout + score). The overlapped host
  step (`submit` batch i, dispatch rollout i+1, then `result()`) costs ~ max(rollout, score)
  when the scorer does not compete for the same CPU cores (the latency-bound row: a remote reward
  server or a scorer on another accelerator). With a CPU-bound scorer on 2 shared cores there is
  nothing to overlap with, and all three are equal within noise.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images / repetitions")
    ap.add_argument("--no-clip-l", action="store_true", help="skip the random CLIP-L-shaped model")
    ap.add_argument("--workers", type=int, default=0,
                    help="only the worker pool: one process vs this many worker processes")
    ap.add_argument("--cost", action="store_true",
                    help="only the one-thread vCPU-seconds per image of the real architectures")
    ap.add_argument("--pool-scorer", default="aesthetic", choices=("aesthetic", "ocr"),
                    help="the scorer of --workers")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.cost:
        with tempfile.TemporaryDirectory() as tmp:
            text = cost_report(bench_cost(tmp, args.quick), args.quick)
        out = args.out or os.path.join(here, "results", "rewards_cost.md")
        with open(out, "w") as f:
            f.write(text)
        print(text)
        return
    if args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_pool(tmp, args.workers, args.quick, args.pool_scorer)
            text = pool_report(rows, args.workers, args.quick, args.pool_scorer)
        out = args.out or os.path.join(here, "results", "rewards_pool.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(text)
        return
    args.out = args.out or os.path.join(here, "results", "rewards.md")

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        scorers = bench_scorers(tmp, args.quick, not args.no_clip_l)
    bridge = bench_bridge(args.quick)
    cb = bench_callback(args.quick)

    lines = ["# Reward scorer throughput", "",
             f"Machine: {machine()}.", "",
             f"Command: `python benchmarks/rewards_throughput.py{' --quick' if args.quick else ''}"
             f"{' --no-clip-l' if args.no_clip_l else ''}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
             "", "## Scorers", "", "| scorer | input | images/s |", "|---|---|---|"]
    lines += [f"| {n} | {i} | {v:.2f} |" for n, i, v in scorers]
    lines += ["", "## Bridge overhead (median ms per batch)", "", "| path | ms |", "|---|---|"]
    lines += [f"| {n} | {v:.2f} |" for n, v in bridge]
    lines += ["", "## Rollout + reward: pure_callback vs host step (ms per batch of 8, 128x128)", "",
              "| scorer | method | ms/batch |", "|---|---|---|"]
    lines += [f"| {s} | {m} | {'' if v is None else f'{v:.1f}'} |" for s, m, v in cb]
    text = "\n".join(lines) + "\n" + NOTES
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
