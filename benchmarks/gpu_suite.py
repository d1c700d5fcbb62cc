"""One-run GPU suite for full-size SD3.5-M shapes (random weights): Flax/JAX vs diffusers + PyTorch eager and
``torch.compile`` in the same process; writes one JSON and a markdown table::

    python benchmarks/gpu_suite.py --out-dir benchmarks/results/gpu   # one H100/H200: sd35m, bf16, cuda
    python benchmarks/gpu_suite.py --dry                              # CPU: tiny preset, same code path
    python benchmarks/gpu_suite.py --attention xla --out-dir ...      # the XLA-attention rows (auto: cuDNN)

Parts (each the project's benchmark of that piece, called in process): the transformer forward at 512 px,
B = 8 (``mmdit_forward.run_benchmark``: parity with diffusers, medians, peak memory where the backend
reports it) and the 14-step rollout at B = 24 (``sampler_rollout.run_benchmark``: the Euler ODE scan vs
a PyTorch loop), and the AWM (LoRA r 32, K = 6, B = 8) and Flow-GRPO (9 SDE steps, CFG 4.5, B = 4) train
steps of the shipped GenEval configs (``awm_jax.rl.train_step``, remat ``full``) against a PyTorch reference
step (diffusers + peft LoRA on the same targets, the loss formulas of ``../shared/REFERENCE.md``, AdamW,
gradient clip 1.0, gradient checkpointing), with MFU against the chip's dense bf16 peak (``GPU_PEAKS``;
model FLOPs of the JAX step counted from its jaxpr without remat, the same work for both) and peak memory.

Budget: the parts run in order and a part whose start would come after ``--budget-s`` (default 420 s: the
8-minute run keeps a minute for the slowest part) is recorded as ``skipped`` instead of run.
``--dry`` runs the tiny preset in fp32 on the CPU without ``torch.compile`` (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402
import mmdit_forward as F  # noqa: E402
import sampler_rollout as R  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(dry: bool, out_dir: str, runs: int = 3, budget_s: float = 420.0,
              attention: str = "auto") -> dict:
    """Run the parts; write ``gpu_suite.json`` and ``gpu_suite.md`` in ``out_dir``; return the record.
    ``attention``: the JAX side's kernel (``model.attention``; ``cudnn`` = cuDNN flash, ``xla`` = XLA's
    attention, ``auto`` = cuDNN for bf16 on a GPU)."""
    from awm_jax.models.attention import resolve

    if dry and attention in ("cudnn", "splash"):
        raise ValueError(f"--attention {attention} needs its accelerator (cudnn: an NVIDIA GPU with bf16); "
                         "--dry runs fp32 on the CPU: use --attention xla or auto")
    resolve(attention)
    common = dict(dtype="fp32", device="cpu", out=None, verbose=False, attention=attention) if dry else dict(
        dtype="bf16", device="cuda", out=None, verbose=True, attention=attention)
    preset = "tiny" if dry else "sd35m"
    t0 = time.time()
    jobs = {
        "forward": lambda: F.run_benchmark(preset, batch=2 if dry else 8, resolution=None if dry else 512,
                                           runs=1 if dry else runs, warmup=1, compile=not dry, **common),
        "rollout_14": lambda: R.run_benchmark(preset, steps=14, batch=2 if dry else 24,
                                              resolution=None if dry else 512, runs=1 if dry else runs,
                                              warmup=1, **common),
        "awm_train_step": lambda: run_train_step("awm", dry, 1 if dry else runs, attention=attention),
        "flow_grpo_train_step": lambda: run_train_step("flow_grpo", dry, 1 if dry else runs,
                                                       attention=attention),
    }
    parts, skipped = {}, []
    for name, job in jobs.items():
        if time.time() - t0 > budget_s:
            skipped.append(name)
            continue
        parts[name] = job()
    rec = {"suite": "gpu_suite", "dry": dry, "preset": preset, "wall_s": time.time() - t0, "parts": parts,
           "skipped": skipped, "budget_s": budget_s, "attention": attention}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_suite.json"), "w") as f:
        json.dump(rec, f, indent=1, default=str)
    lines = [f"JAX attention: {attention} (model.attention)", "",
             "| part | impl | median s | torch / jax | parity rel max err | MFU | peak GB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, p in parts.items():
        jax_s = p["jax"]["median_s"]
        for impl in ("jax", "torch_eager", "torch_compile"):
            r = p.get(impl)
            if not r or r.get("median_s") is None:
                if r:
                    lines.append(f"| {name} | {impl} | {r.get('error', 'n/a')} | | | | |")
                continue
            s = r["median_s"]
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
            peak = f"{r['peak_bytes'] / 1e9:.1f}" if r.get("peak_bytes") else "n/a"
            lines.append(f"| {name} | {impl} | {s:.4g} | {s / jax_s:.2f} | "
                         f"{p.get('parity_rel_max_err', float('nan')):.3g} | {mfu} | {peak} |")
    lines += [f"| {name} | skipped (budget {budget_s:.0f} s) | | | | | |" for name in skipped]
    with open(os.path.join(out_dir, "gpu_suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rec


# ------------------------------------------------------------------------------------------ train steps
# Dense bf16 peak FLOP/s (NVIDIA H100 / H200 SXM datasheets: 989 TFLOP/s bf16 dense, no sparsity)
GPU_PEAKS = {"H100": 989e12, "H200": 989e12}


def _peak_flops(device_kind: str) -> float | None:
    for name, peak in GPU_PEAKS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def _train_config(algo: str, dry: bool, n: int, remat: str, attention: str = "auto"):
    """The shipped SD3.5-M GenEval config of ``algo`` (LoRA r 32, K = 6 / 9 SDE steps), one device,
    ``n`` samples per optimizer step in one micro-batch."""
    from awm_jax import config_lib

    name = "sd35m_geneval.py" if algo == "awm" else "sd35m_geneval_flow_grpo.py"
    c = config_lib.load_config(os.path.join(ROOT, "configs", name))
    c.model.dtype = "float32" if dry else "bfloat16"
    c.model.remat_policy = remat
    c.model.attention = attention
    c.lora.rank = 32
    c.mesh.data = 1
    c.train.micro_batch_size = n
    if dry:  # the same code path, fewer passes: K = 2 (AWM), 2 SDE steps, 1 trained (Flow-GRPO)
        c.awm.train_timesteps = 2
        if algo != "awm":
            c.sample.num_steps = 2
    return c


def _model_flops(model, c, mesh, neg, base, batch, key) -> float:
    """The model FLOPs of one train step: the jaxpr count (``awm_jax.flops``) of the same step built on an
    abstract copy of ``model`` without remat (XLA's cost analysis counts loop bodies once and includes the
    recomputation)."""
    import jax
    from flax import nnx

    from awm_jax.flops import traced_flops
    from awm_jax.models.family import get_family
    from awm_jax.rl import train_step as ts

    fam = get_family(str(c.model.kind))
    plain = nnx.eval_shape(lambda: fam.build(model.config, rngs=nnx.Rngs(0), dtype=model.dtype,
                                             param_dtype=model.param_dtype, remat_policy="none",
                                             attention="xla"))
    graphdef, _, state = ts.create_train_state(plain, c)
    step = ts.make_train_step(graphdef, c, mesh, negative=neg)
    spec = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), (state, base, batch))
    return traced_flops(step, *spec, jax.eval_shape(lambda: key)).flops


def _jax_train(algo: str, tm, preset: str, dry: bool, n: int, remat: str, runs: int, seed: int = 0,
               attention: str = "auto"):
    """Time the project's train step (``awm_jax.rl.train_step``) on random rollouts; its model FLOPs
    (:func:`_model_flops`)."""
    import tempfile

    import jax
    import jax.numpy as jnp

    from awm_jax.models import load_transformer
    from awm_jax.rl import train_step as ts

    c = _train_config(algo, dry, n, remat, attention)
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d)
        model = load_transformer(d, dtype=U.jax_dtype("fp32" if dry else "bf16"),
                                 param_dtype=U.jax_dtype("fp32" if dry else "bf16"), remat_policy=remat,
                                 attention=attention)
    graphdef, base, state = ts.create_train_state(model, c)
    inp = F.make_inputs(preset, n, F.preset(preset)["resolution"] if dry else 512,
                        F.preset(preset)["seq_len"], seed)
    rs = np.random.RandomState(seed + 1)
    x, emb, pooled = (jnp.asarray(inp[k]) for k in ("hidden_states", "encoder_hidden_states",
                                                     "pooled_projections"))
    adv = jnp.asarray(rs.uniform(-1, 1, n).astype(np.float32))
    neg = None
    if algo == "awm":
        batch = {"x0": x, "prompt_embeds": emb, "pooled": pooled, "advantages": adv}
    else:
        s = int(c.sample.num_steps)
        grid = np.linspace(1.0, 0.0, s + 1, dtype=np.float32)
        batch = {"latents": jnp.asarray(rs.randn(n, s + 1, *x.shape[1:]).astype(np.float32)),
                 "log_probs": jnp.asarray(rs.randn(n, s).astype(np.float32)),
                 "timesteps": jnp.asarray(np.tile(grid[:-1], (n, 1))),
                 "next_timesteps": jnp.asarray(np.tile(grid[1:], (n, 1))),
                 "prompt_embeds": emb, "pooled": pooled, "advantages": adv}
        neg = (jnp.zeros((1, *emb.shape[1:])), jnp.zeros((1, pooled.shape[1])))
    from awm_jax import parallel

    mesh = parallel.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    step = ts.make_train_step(graphdef, c, mesh, negative=neg)
    key = jax.random.key(seed)
    box = {"state": state}

    def call():
        box["state"], m = step(box["state"], base, batch, key)
        return m

    rec = U.time_calls(call, runs, 1, jax.block_until_ready)
    rec["flops"] = _model_flops(model, c, mesh, neg, base, batch, key)
    rec["flops_note"] = ("jaxpr count of the same step without remat (awm_jax.flops: matmuls, loop trip "
                         "counts included; the model FLOPs of MFU, no recomputation)")
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    rec["peak_bytes"] = stats.get("peak_bytes_in_use")
    rec["samples"], rec["forwards_per_sample"] = n, _forwards(algo, c)
    return rec, c


def _forwards(algo: str, c) -> str:
    if algo == "awm":
        return (f"K={int(c.awm.train_timesteps)} x (policy fwd+bwd, reference fwd"
                f"{', kl-EMA fwd' if float(c.awm.ema_beta) else ''})")
    s = int(int(c.sample.num_steps) * float(c.flow_grpo.timestep_fraction))
    return f"{s} SDE steps x CFG 2 x (policy fwd+bwd, reference fwd)"


def _torch_train(algo: str, tm, c, preset: str, dry: bool, n: int, runs: int, compile: bool, seed: int = 0):
    """The PyTorch reference step: diffusers ``SD3Transformer2DModel`` + LoRA (peft through diffusers'
    ``add_adapter``), the same loss formulas (``../shared/REFERENCE.md`` sections 3-4), AdamW, clip 1.0."""
    import torch
    from peft import LoraConfig

    dev = U.torch_device("cpu" if dry else "cuda")
    tdt = torch.float32 if dry else torch.bfloat16
    m = tm.to(device=dev, dtype=tdt)
    m.add_adapter(LoraConfig(r=int(c.lora.rank), lora_alpha=float(c.lora.alpha),
                             target_modules=list(c.lora.targets), init_lora_weights="gaussian"))
    if str(c.model.remat_policy) != "none":
        m.enable_gradient_checkpointing()
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    res = F.preset(preset)["resolution"] if dry else 512
    inp = F.make_inputs(preset, n, res, F.preset(preset)["seq_len"], seed)
    x0, emb, pooled = (torch.from_numpy(inp[k]).to(dev, tdt) for k in
                       ("hidden_states", "encoder_hidden_states", "pooled_projections"))
    adv = torch.rand(n, device=dev) * 2 - 1

    def fwd(model, x, t, e, p):
        return model(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t * 1000,
                     return_dict=False)[0].float()

    def awm_step(model):
        k = int(c.awm.train_timesteps)
        t = torch.rand(k, n, device=dev) * 0.6 + 0.36
        eps = torch.randn(k, n, *x0.shape[1:], device=dev)
        xt = ((1 - t)[..., None, None, None] * x0.float()[None] + t[..., None, None, None] * eps)
        xt, tt = xt.reshape(k * n, *x0.shape[1:]).to(tdt), t.reshape(-1)
        e, p = emb.repeat(k, 1, 1), pooled.repeat(k, 1)
        v = fwd(model, xt, tt, e, p)
        with torch.no_grad():
            model.disable_adapters()
            v_ref = fwd(model, xt, tt, e, p)
            model.enable_adapters()
            v_ema = fwd(model, xt, tt, e, p) if float(c.awm.ema_beta) else v.detach()
        target = (eps - x0.float()[None]).reshape(k * n, *x0.shape[1:])
        mse = ((v - target) ** 2).mean(dim=(1, 2, 3))
        pw = float(c.awm.ghuber_power)
        logp = -((mse + 1e-10) ** pw - 1e-10 ** pw) * tt / pw
        ratio = torch.exp(logp - logp.detach())
        a = adv.repeat(k)
        cr = float(c.awm.clip_range)
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cr, 1 + cr)).mean()
        kl = ((v - v_ref) ** 2).mean()
        kl_ema = ((v - v_ema) ** 2).mean()
        return pg + float(c.awm.beta) * kl + float(c.awm.ema_beta) * kl_ema

    def grpo_step(model):
        s_total = int(c.sample.num_steps)
        s_train = int(s_total * float(c.flow_grpo.timestep_fraction))
        grid = torch.linspace(1, 0, s_total + 1, device=dev)
        a, g = float(c.sample.noise_level), float(c.sample.guidance_scale)
        e2, p2 = torch.cat([emb, torch.zeros_like(emb)]), torch.cat([pooled, torch.zeros_like(pooled)])
        def guided(model, x, t):
            vc, vu = fwd(model, torch.cat([x, x]).to(tdt), t.expand(2 * n), e2, p2).chunk(2)
            return vu + g * (vc - vu)

        def sde_mean(v, x, t, tn):
            dt = tn - t
            std = a * torch.sqrt(t / (1 - torch.where(t == 1, grid[1], t)))
            mean = x * (1 + std ** 2 * dt / (2 * t)) + v * (1 + std ** 2 * (1 - t) / (2 * t)) * dt
            return mean, std, dt

        total = 0.0
        for j in range(s_train):  # one backward per sampling step, as the reference trainer
            t, tn = grid[j], grid[j + 1]
            x = torch.randn(n, *x0.shape[1:], device=dev)
            x_next = torch.randn_like(x)
            lp_old = torch.randn(n, device=dev)

            mu, std, dt = sde_mean(guided(model, x, t), x, t, tn)
            with torch.no_grad():
                model.disable_adapters()
                mu_ref, _, _ = sde_mean(guided(model, x, t), x, t, tn)
                model.enable_adapters()
            sd = std * torch.sqrt(-dt)
            lp = -(x_next - mu) ** 2 / (2 * sd ** 2) - torch.log(sd) - 0.5 * np.log(2 * np.pi)
            lp = lp.mean((1, 2, 3))
            r = torch.exp(lp - lp_old)
            cr = float(c.flow_grpo.clip_range)
            pg = torch.maximum(-adv * r, -adv * r.clamp(1 - cr, 1 + cr)).mean()
            kl = ((mu - mu_ref) ** 2).mean((1, 2, 3)) / (2 * std ** 2)
            loss = pg + float(c.flow_grpo.beta) * kl.mean()
            loss.backward()
            total = total + loss.detach()
        return total

    def step(model):
        opt.zero_grad(set_to_none=True)
        if algo == "awm":
            awm_step(model).backward()
        else:
            grpo_step(model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    sync = lambda r: U.torch_sync(dev)  # noqa: E731
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"torch_eager": U.time_calls(lambda: step(m), runs, 1, sync)}
    if dev.type == "cuda":
        out["torch_eager"]["peak_bytes"] = torch.cuda.max_memory_allocated()
    if compile:
        out["torch_compile"] = U.torch_compile_timing(m, step, runs, 1, sync)
    return out


def run_train_step(algo: str, dry: bool, runs: int, seed: int = 0, attention: str = "auto") -> dict:
    """One train-step part: JAX step vs the PyTorch reference step, MFU from XLA's FLOPs."""
    import jax

    preset = "tiny" if dry else "sd35m"
    n = 2 if dry else 8 if algo == "awm" else 4
    remat = "none" if dry else "full"
    rec: dict = {"algo": algo, "preset": preset, "samples": n, "remat_policy": remat, "attention": attention}
    rec["jax"], c = _jax_train(algo, F.build_torch_transformer(preset, seed), preset, dry, n, remat, runs,
                               seed, attention)
    rec.update(_torch_train(algo, F.build_torch_transformer(preset, seed), c, preset, dry, n, runs,
                            compile=not dry, seed=seed))
    kind = jax.devices()[0].device_kind
    peak = _peak_flops(kind)
    rec["device_kind"], rec["peak_flops"] = kind, peak
    flops = rec["jax"]["flops"]
    for impl in ("jax", "torch_eager", "torch_compile"):
        r = rec.get(impl, {})
        if peak and flops and r.get("median_s"):
            r["mfu"] = flops / r["median_s"] / peak  # the same work: the JAX step's model FLOPs
    return rec


def main(argv=None) -> dict:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny preset, fp32, no torch.compile")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many seconds")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                    help="the JAX kernel (model.attention): cudnn vs xla rows; run the suite once per value")
    a = ap.parse_args(argv)
    rec = run_suite(a.dry, a.out_dir, a.runs, a.budget_s, a.attention)
    print(open(os.path.join(a.out_dir, "gpu_suite.md")).read())
    return rec


if __name__ == "__main__":
    main()
