"""The reward budget of a step: host seconds of scoring beside the device estimate (`python -m awm_jax.plan`).

Host scoring costs ``images per step x vCPU-seconds per image`` (:data:`COST`, one thread, CPU time measured
on the project's 2-vCPU VM with the real architectures and random weights) spread over the slice's host vCPUs
(``--host-cores-per-chip``, else :data:`HOST_VCPUS_PER_CHIP`), assuming it scales over every vCPU (the
worker pool, ``awm_jax.rewards.pool``; the measured scaling on this VM is in BENCHMARKS.md "Reward worker
pool"). The trainer overlaps scoring with the next rollout block (``awm_jax.rl.collect``), never with the
train step (it needs the rewards), so the step is about ``train + max(rollouts, host scoring)``: the host
bounds the step when its scoring takes longer than the rollouts. A scorer on the accelerator
(``reward.<name>.device = "accelerator"``) costs the host nothing; one behind ``reward.remote`` costs the
reward servers' cores, not the trainer hosts'.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COST", "HOST_VCPUS_PER_CHIP", "budget", "fmt"]

# vCPU-seconds per image, one thread (torch / onnxruntime on CPU), 512x512 inputs: (figure, how it was made).
# "measured" = `python benchmarks/rewards_throughput.py --cost` (benchmarks/results/rewards_cost.md): CPU
# time of the process at one thread, real architectures with random weights (OCR: its real ONNX models), so
# not inflated by the shared VM's load. "modeled" = scaled from a measured architecture by tokens / FLOPs.
COST: dict[str, tuple[float, str]] = {
    "pickscore": (4.23, "CLIP-H/14 image + text (measured)"),
    "hps": (4.23, "open_clip ViT-H-14 towers = PickScore's (modeled)"),
    "aesthetic": (2.36, "CLIP-L/14 image tower incl. the CLIP processor (measured)"),
    "clipscore": (2.51, "CLIP-L/14 image 2.36 (measured) + text ~0.15 (modeled from CLIP-H's by FLOPs)"),
    "imagereward": (2.0, "BLIP ViT-L/16 at 224 px (197 tokens: ~0.77 of CLIP-L/14's 2.36) + BERT-base text "
                         "with cross-attention ~0.2 (modeled)"),
    "geneval": (13.89, "Mask2Former Swin-S at 800 px 9.17 + 2 detected objects x CLIP-L/14 2.36 (measured "
                       "parts; 2 objects per image assumed)"),
    "ocr": (0.24, "RapidOCR det 736/min + rec (measured)"),
    "jpeg_compressibility": (0.002, "PIL JPEG encode (measured)"),
    "jpeg_incompressibility": (0.002, "PIL JPEG encode (measured)"),
}

# Host vCPUs per TPU chip (Google Cloud TPU VM machine types; an assumption: check your VM's `nproc` and pass
# --host-cores-per-chip): v6e-8 one ct6e-standard-8t VM, 180 vCPUs for 8 chips (multi-host v6e slices use
# ct6e-standard-4t VMs: 180 vCPUs per 4 chips, 45 per chip); v5e ct5lp-hightpu-8t, 224 vCPUs for 8 chips
# (ct5lp-hightpu-4t: 112 for 4); v5p 208 vCPUs per 4-chip VM.
HOST_VCPUS_PER_CHIP = {"v6e": 22.5, "v5e": 28.0, "v5p": 52.0}


def _placement(config, name: str) -> str:
    if config.reward.remote:
        return "remote"
    section = config.reward.get(name)
    device = section.get("device", "cpu") if hasattr(section, "get") else "cpu"
    return "accelerator" if str(device) == "accelerator" else "host"


def budget(config, res: dict, cores_per_chip: float = 0.0) -> dict:
    """The reward budget of one step of ``config`` beside the plan ``res`` (``awm_jax.plan.plan``)."""
    name = str(config.reward.name)
    chip = str(res["topology"]).split(":", 1)[0]
    chips = int(res["chips"])
    assumed = not cores_per_chip
    per_chip = float(cores_per_chip) if cores_per_chip else HOST_VCPUS_PER_CHIP.get(chip, 0.0)
    images = int(config.data.prompts_per_step) * int(config.data.group_size)
    out: dict[str, Any] = {"reward": name, "placement": _placement(config, name), "images": images,
                           "chips": chips, "vcpus_per_chip": per_chip, "vcpus_assumed": assumed}
    cost = COST.get(name)
    out["vcpu_s_per_image"], out["cost_source"] = cost if cost else (None, None)
    ok = res.get("step_s") is not None
    out["device_rollout_s"] = res["rollout_calls"] * res["rollout"]["est_s"] if ok else None
    out["device_train_s"] = res["train_step"]["est_s"] if ok else None
    out["device_step_s"] = res.get("step_s")
    if cost is None or out["placement"] != "host":
        out["host_s"] = 0.0 if out["placement"] == "accelerator" else None
    else:
        out["host_vcpu_s"] = images * cost[0]
        out["host_s"] = out["host_vcpu_s"] / max(per_chip * chips, 1e-9)
    if ok and out["host_s"] is not None:
        out["step_s"] = out["device_train_s"] + max(out["device_rollout_s"], out["host_s"])
        out["host_bound"] = out["host_s"] > out["device_rollout_s"]
    return out


def fmt(b: dict) -> str:
    """The budget as the planner's text."""
    name, place = b["reward"], b["placement"]
    head = f"reward budget ({name!r}, {b['images']} images per step):"
    if place == "accelerator":
        return f"{head} scored on the accelerator inside the rollout program: no host scoring"
    if b["vcpu_s_per_image"] is None:
        return (f"{head} no cost figure for this scorer (awm_jax.reward_budget.COST; measure it with "
                "benchmarks/rewards_throughput.py)")
    if place == "remote":
        total = b["images"] * b["vcpu_s_per_image"]
        return (f"{head} scored on the reward servers (reward.remote): {total:.4g} vCPU-s per step there at "
                f"{b['vcpu_s_per_image']:.3g} vCPU-s per image; the trainer hosts only send images")
    src = "assumed" if b["vcpus_assumed"] else "given"
    lines = [f"{head} {b['vcpu_s_per_image']:.3g} vCPU-s per image ({b['cost_source']}) -> "
             f"{b['host_vcpu_s']:.4g} vCPU-s per step over {b['chips']} chips x {b['vcpus_per_chip']:.3g} "
             f"host vCPUs ({src}; --host-cores-per-chip) = {b['host_s']:.4g} s of host scoring per step "
             "(if it scales over every vCPU: reward.workers)"]
    if b.get("step_s") is None:
        lines.append("  no device estimate (a program did not compile)")
        return "\n".join(lines)
    lines.append(f"  device: rollouts {b['device_rollout_s']:.4g} s + train step {b['device_train_s']:.4g} s "
                 f"= {b['device_step_s']:.4g} s per step (XLA est.; scoring overlaps the rollouts only)")
    if b["host_bound"]:
        lines.append(f"  HOST-BOUND: scoring ({b['host_s']:.4g} s) outlasts the rollouts; step ~ "
                     f"{b['step_s']:.4g} s instead of {b['device_step_s']:.4g} s (more host vCPUs, the "
                     "accelerator-side scorer or reward servers would lift it)")
    else:
        lines.append(f"  device-bound: scoring ({b['host_s']:.4g} s) hides behind the rollouts "
                     f"({b['device_rollout_s']:.4g} s); step ~ {b['step_s']:.4g} s")
    return "\n".join(lines)
