"""Shared base for every shipped config: one function builds a task x algorithm x setting config.

AWM and Flow-GRPO configs share everything here and differ only in ``_flow_grpo`` (sampler, loss
block and the keys where the algorithms differ). ``paper=True`` switches to the AWM paper's
settings (Euler-Maruyama sampler, 4 training times, uniform weighting, larger beta, no EMA term);
the default reproduces the public AWM code (see REFERENCE.md in the project's shared folder).
"""

import ml_collections

# The SD3.5 configs' LoRA targets: the public AWM / Flow-GRPO list, matched by PEFT's rule (module name ==
# target or ends with "." + target), so the dual-attention blocks' ``attn2.*`` are NOT adapted (191 layers,
# 18.8 M parameters at r 32 on SD3.5-M; the bare names "to_q", ... would add attn2: 243 layers, 23.9 M).
SD35_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out",
)

# Per-task defaults of the public AWM code.  (beta, noise_level, timestep_sampler, prompts/step)
_TASKS = {
    "geneval": dict(beta=0.001, noise=0.4, ts="discrete_wo_init", prompts=72, reward="geneval",
                    fmt="geneval", grpo_beta=0.04, paper_beta=0.4),
    "ocr": dict(beta=0.003, noise=0.4, ts="discrete_wo_init", prompts=72, reward="ocr",
                fmt="ocr", grpo_beta=0.04, paper_beta=0.4),
    "pickscore": dict(beta=0.0001, noise=0.0, ts="discrete", prompts=24, reward="pickscore",
                      fmt="text", grpo_beta=0.01, paper_beta=0.01),
}


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer knows, with the public AWM code's SD3.5-Medium defaults."""
    c = ml_collections.ConfigDict()
    # objective (awm_jax.rl.registry, docs/objectives.md): awm|flow_grpo|nft|elbo_exact_reinforce|
    # elbo_exact_grpo (exact-weight ELBO; old names elbo_reinforce|elbo_grpo still load, deprecated)|epg|pepg|
    # par|epg_noratio|pepg_noratio|par_noratio|epg_grpo (seed 004's ELBO policy gradients)|ram (RAM)
    c.algorithm = "awm"  # objective name
    c.seed = 42  # master seed: init, data order, rollout and training noise all derive from (seed, step)
    c.max_steps = 1000  # number of epochs (loop steps: rollouts + train.steps_per_epoch optimizer steps)
    c.components = "awm_jax.train:default_components"  # "module:function" returning the loop's components

    c.model = m = ml_collections.ConfigDict()
    m.kind = "sd35"  # model family (awm_jax.models.family): "sd35" (SD3 / SD3.5), "flux", "zimage", "toy"
    m.arch = "sd3.5-medium"  # named architecture of the family (its `architectures`): plans from shapes
    # model.path: the diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder*/,
    # tokenizer*/; transformer/ and vae/ may hold converted Flax weights) or its transformer/;
    # "" = toy random init
    m.path = ""  # the pipeline folder (or its transformer/ folder)
    m.vae_path = ""  # VAE weights directory; "" = <pipeline folder>/vae
    # text encoder dirs, "" = <pipeline folder>/text_encoder{,_2,_3} (SD3: CLIP-L, G, T5; FLUX: CLIP-L, T5);
    # SD3's third entry "none" skips T5 (zeros, as diffusers without it)
    m.text_encoder_paths = ("", "", "")  # one per text encoder
    m.max_sequence_length = 128  # T5 tokens (the AWM code uses 128)
    m.resolution = 512  # image side in pixels
    m.dtype = "bfloat16"  # compute dtype of the transformer
    m.param_dtype = "float32"  # storage dtype of the parameters
    m.text_cache_mb = 2048.0  # in-memory LRU cache of prompt embeddings, bounded in MiB (0 = no cache)
    m.scan_layers = False  # stack identical blocks and run them with nnx.scan (faster compiles)
    # |save_attention (recompute each block in the backward except its attention: kernel output kept; with
    # splash the kernel's forward still re-runs: policies do not reach its residuals, BENCHMARKS "TPU plan")
    m.remat_policy = "none"  # per-block activation checkpointing: none|full|dots_saveable|nothing_saveable
    # |cudnn; splash: Pallas TPU flash kernel (interpret mode off TPU: slow, tests); cudnn: 16-bit only
    m.attention = "auto"  # attention kernel (models/attention.py): auto (TPU splash, GPU cudnn)|xla|splash
    m.guidance = 3.5  # distilled guidance fed to the model (FLUX.1-dev); families without it ignore the key

    c.lora = lo = ml_collections.ConfigDict()
    lo.rank = 32  # LoRA rank r
    lo.alpha = 64.0  # LoRA alpha (scale alpha / r)
    lo.targets = ()  # module-name suffixes that get adapters; () = the model family's default targets
    lo.init = "gaussian"  # A ~ N(0, 1/r), B = 0
    lo.full_finetune = False  # train every parameter instead (the reference then needs a frozen copy)

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 3e-4  # AdamW learning rate (constant)
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.999  # Adam beta2
    o.weight_decay = 1e-4  # decoupled weight decay
    o.eps = 1e-8  # Adam epsilon
    o.max_grad_norm = 1.0  # global-norm gradient clipping

    c.data = d = ml_collections.ConfigDict()
    d.train_prompts = ""  # prompt file for training (one per line, or GenEval JSONL)
    d.train_format = "geneval"  # "text" | "geneval" (JSONL with metadata) | "ocr" (quoted target text)
    d.eval_prompts = ""  # held-out prompt file for evaluation
    d.eval_format = "geneval"  # format of eval_prompts
    d.group_size = 24  # images per prompt (one advantage group), across all devices and hosts
    d.prompts_per_step = 72  # distinct prompts per optimizer step (72 x 24 GenEval/OCR, 24 x 24 PickScore)

    c.sample = s = ml_collections.ConfigDict()
    # rollout sampler: "sa_solver" | "euler_maruyama" | "ode" | "sde" | "cps" | "dpm2" (DiffusionNFT's
    # deterministic multistep DPM-Solver++(2M) rollouts; docs/samplers.md)
    s.sampler = "sa_solver"  # rollout sampler (see above)
    s.num_steps = 14  # rollout sampling steps
    s.noise_level = 0.4  # SA-Solver tau / SDE noise level a
    s.noise_t_min = 0.3  # SA-Solver: stochastic only for noise_t_min <= t <= noise_t_max
    s.noise_t_max = 0.9  # upper end of the stochastic window
    s.shift = 3.0  # time shift of the sampling grid (SD3: 3; FLUX: 0 = dynamic by resolution)
    s.guidance_scale = 1.0  # classifier-free guidance in rollouts and Flow-GRPO training (1.0 = none, as AWM)
    s.batch_size = 8  # rollout micro-batch per device (memory knob only; results do not depend on it)

    c.advantages = a = ml_collections.ConfigDict()
    a.std_mode = "global"  # "global": std over all rewards of the step; "group": per-prompt std
    a.eps = 1e-4  # added to the std
    a.clip = 5.0  # advantages clipped to [-clip, clip]
    a.correct_threshold = 1.0  # reward >= this counts as "correct" (all-correct / all-wrong fractions)
    # "standard": (R - group mean) / (std + eps) | "exact": exact_scale (R - group mean), no std (seed 004)
    a.mode = "standard"  # advantage formula
    a.exact_scale = 0.1  # "exact" mode's factor: seed 004's BETA / ALPHA = 1e-4 / 1e-3

    c.awm = w = ml_collections.ConfigDict()
    # awm.*: AWM's keys, shared by the other clean-sample objectives (nft, elbo_reinforce, elbo_grpo)
    w.train_timesteps = 6  # K training times per sample
    # "discrete" | "discrete_wo_init" | "uniform" | "logit_normal" | "permutation" (per sample a random
    # permutation of the S sampler-grid times, the first int(S * timestep_fraction) = train_timesteps of them)
    w.timestep_sampler = "discrete_wo_init"  # training-time sampler
    w.timestep_draw = "sample"  # "sample": each sample its own stratified K-tuple | "step": one for the step
    w.timestep_fraction = 0.9  # discrete: upper stratum bound int(num_steps * fraction); permutation: count
    w.weighting = "ghuber"  # w(t): "uniform" | "t" | "t2" | "ghuber" | "elbo" ((1 - t) / t, the ELBO's)
    w.ghuber_power = 0.25  # ghuber power p
    w.beta = 0.001  # weight of KL to the reference (base) model, velocity space
    w.ema_beta = 1.0  # weight of KL to the kl-EMA adapter (0 disables the kl-EMA term)
    w.kl_elbo = False  # divide the KL terms by 2 sigma(t)^2
    w.clip_range = 1.0  # PPO ratio clip c (awm, elbo_grpo)
    w.advantage_max = 1.0  # A <- clip(A) / clip * advantage_max
    w.on_policy = True  # logp_old = stopgrad(logp); False uses the sampling policy's logp
    w.loss_type = "per_time"  # "per_time" | "mean_over_times" (ratio of the means over the K times)

    c.nft = n = ml_collections.ConfigDict()  # DiffusionNFT (A_max = advantages.clip, KL = awm.beta)
    n.beta = 1.0  # implicit-policy strength b: v+ = (1 - b) v_old + b v, v- = (1 + b) v_old - b v
    n.adaptive_weighting = True  # divide each x0-space error by stopgrad(mean |x0_pred - x0|)

    c.elbo = el = ml_collections.ConfigDict()  # seed 004's ELBO policy gradients (epg, pepg, par, epg_grpo)
    el.likelihood = "adaptive"  # ELBO per (time, sample): "adaptive" | "exact" | "uniform" | "t" (docs)
    el.clip_range = 1e-3  # epg_grpo: PPO clip of the per-(time, sample) ELBO ratio
    el.adv_clamp = 5.0  # epg_grpo: advantages clamped to [-adv_clamp, adv_clamp] inside the loss

    c.ram = rm = ml_collections.ConfigDict()  # RAM (Reinforce Adjoint Matching)
    rm.rho = 100.0  # target v_ref + rho A (u - v_old): reward multiplier / inverse KL temperature

    c.flow_grpo = g = ml_collections.ConfigDict()
    g.clip_range = 1e-4  # PPO clip
    g.beta = 0.04  # KL weight
    g.timestep_fraction = 0.99  # train the first int(num_steps * fraction) sampling steps
    g.cfg_detach_uncond = True  # CFG in training: no gradient through the unconditional branch (as the
    # reference's noise_pred_uncond.detach()); False differentiates both branches (awm-jax before issue 13)

    c.select = sl = ml_collections.ConfigDict()
    # rollout selection (Sol-RL, arXiv 2604.06916; docs/selection.md), for any algorithm: per prompt preview
    # num_seeds seeds with a cheap deterministic sampler, keep the seeds of the top_k best and bottom_k worst
    # previews (top_k + bottom_k = data.group_size) and regenerate those with the normal rollout
    sl.enabled = False  # preview, select, regenerate (False: every rollout is trained on, as the baselines)
    sl.num_seeds = 96  # candidate seeds previewed per prompt (Sol-RL: 96 per prompt, 24 kept)
    sl.top_k = 12  # seeds of the highest-reward previews kept per prompt (Sol-RL: 12)
    sl.bottom_k = 12  # seeds of the lowest-reward previews kept per prompt (Sol-RL: 12)
    sl.preview_steps = 6  # sampling steps of a preview (Sol-RL: preview_step = 6; rollouts 10)
    sl.preview_sampler = "dpm2"  # deterministic preview sampler: "dpm2" | "ode"
    # weights of the previews: "float32" (the policy's own), or rounded to "bfloat16" / "float16" (one cached
    # low-precision copy of the base; Sol-RL previews with an NVFP4 copy, which JAX has no counterpart of)
    sl.preview_dtype = "float32"  # preview weight dtype: "float32" | "bfloat16" | "float16"

    c.ema = e = ml_collections.ConfigDict()
    # the kl-EMA adapter is also the old (sampling) policy of nft, elbo_exact_grpo, the seed-004 objectives
    # and ram (and of AWM off-policy)
    e.kl_decay_rate = 0.001  # kl-EMA decay d = min(kl_decay_max, kl_decay_rate * step)
    e.kl_decay_max = 0.3  # cap of the kl-EMA decay
    e.eval_ema = True  # keep an evaluation EMA of the adapter, decay min((1+s)/(10+s), eval_decay_max)
    e.eval_decay_max = 0.99  # cap of the eval-EMA decay
    e.eval_every = 1  # update the eval EMA after optimizer steps s with (s + 1) % eval_every == 0 (ref: 8)

    c.reward = r = ml_collections.ConfigDict()
    r.name = "geneval"  # name in awm_jax.rewards' registry
    # Each shipped reward's settings: the section named by reward.name is passed to awm_jax.rewards.get
    # (paths "" = not given / the scorer's default); reward.kwargs holds any other reward's keywords
    # (aesthetic, multi; --config.reward.kwargs.NAME=VALUE adds one) and overrides the section. Paths are
    # relative to the working directory (the layout of tools/fetch_assets.py).
    r.geneval = rg = ml_collections.ConfigDict()  # reward "geneval" (detector + CLIP colour classifier)
    rg.detector_path = "weights/rewards/mask2former-swin-small-coco"  # detector folder (transformers format)
    rg.clip_path = "weights/rewards/clip-vit-large-patch14"  # CLIP colour classifier folder (+ its processor)
    rg.batch_size = 8  # detector images per forward pass
    rg.device = "cpu"  # torch device of the detector and CLIP
    r.ocr = ro = ml_collections.ConfigDict()  # reward "ocr" (RapidOCR, ONNX)
    ro.det_model_path = ""  # text detector .onnx ("" = the model shipped in the rapidocr wheel)
    ro.rec_model_path = ""  # text recogniser .onnx ("" = the wheel's)
    ro.cls_model_path = ""  # angle classifier .onnx ("" = the wheel's)
    ro.det_limit_side_len = 736  # detector resize side (rapidocr default; 512 with "max" keeps 512 px images)
    ro.det_limit_type = "min"  # "min" | "max": which image side det_limit_side_len bounds
    r.pickscore = rp = ml_collections.ConfigDict()  # reward "pickscore" (CLIP-H with PickScore_v1 weights)
    rp.model_path = "weights/rewards/pickscore_v1"  # CLIPModel folder
    rp.processor_path = "weights/rewards/clip-vit-h-14"  # its processor folder ("" = model_path)
    rp.device = "cpu"  # torch device, or "accelerator": scored in JAX after the decode (rewards/device_clip)
    # The CLIP-family rewards (pickscore, aesthetic, hps, clipscore) all take device = "accelerator": a Flax
    # CLIP scores inside a jitted program on the decoded images (sharded over the batch, no image leaves
    # the device; preprocessing bit-exact with the PIL CLIPImageProcessor on square images); else on host.
    r.aesthetic = ra = ml_collections.ConfigDict()  # reward "aesthetic" (LAION predictor: CLIP-L + MLP head)
    ra.clip_path = "weights/rewards/clip-vit-large-patch14"  # CLIPModel folder (+ its processor)
    ra.head_path = "weights/rewards/sac+logos+ava1-l14-linearMSE.pth"  # MLP head (.pth / .safetensors)
    ra.device = "cpu"  # torch device or "accelerator"
    r.hps = rh = ml_collections.ConfigDict()  # reward "hps" (HPSv2.1: open_clip ViT-H-14 state dict)
    rh.checkpoint_path = "weights/rewards/HPS_v2.1_compressed.pt"  # open_clip state dict (.pt / .safetensors)
    rh.processor_path = "weights/rewards/clip-vit-h-14"  # CLIP processor + tokenizer folder (laion ViT-H-14)
    rh.arch = "ViT-H-14"  # open_clip architecture (name, or an open_clip model-config .json)
    rh.device = "cpu"  # torch device (host scorer needs open_clip) or "accelerator"
    r.clipscore = rc = ml_collections.ConfigDict()  # reward "clipscore": weight * max(cos(image, text), 0)
    rc.model_path = "weights/rewards/clip-vit-large-patch14"  # CLIPModel folder (+ its processor)
    rc.weight = 2.5  # w of CLIPScore (Hessel et al. 2021); torchmetrics' CLIPScore uses 100
    rc.device = "cpu"  # torch device or "accelerator"
    r.toy_geneval = rt = ml_collections.ConfigDict()  # reward "toy_geneval" (the toy world's detector)
    rt.strict = False  # reward = the strict GenEval verdict (0/1) instead of the partial score
    r.kwargs = ml_collections.ConfigDict()  # extra keywords to awm_jax.rewards.get(name, ...): other rewards
    r.retries = 2  # reward bridge retries per batch
    r.timeout_s = 600.0  # give up one scorer attempt after this many seconds (retried; 0 = no limit)
    # host scoring in worker processes (awm_jax/rewards/pool.py): each its own scorer copy and torch threads
    r.workers = -1  # scorer processes: -1 = one per 4 host cores (heavy scorers only); 0 / 1 = in-process
    r.worker_threads = 0  # torch threads per worker (0: host cores // workers)
    # reward servers (python -m awm_jax.rewards.serve; awm_jax/rewards/remote.py): () = score on this host
    r.remote = ()  # endpoints ("http://10.0.0.2:8100", "http://10.0.0.3:8100"): batches spread over them
    r.remote_timeout_s = 600.0  # per request; a timed-out / unreachable endpoint's chunk goes to a live one

    c.eval = v = ml_collections.ConfigDict()
    v.every = 50  # evaluate every N epochs (loop steps; 0 = never; also at the last step)
    v.num_steps = 40  # ODE steps
    v.num_prompts = 0  # held-out prompts to evaluate (0 = all)
    v.samples_per_prompt = 1  # images per eval prompt
    v.use_ema = True  # evaluate with the eval-EMA adapter when it exists
    v.guidance_scale = 1.0  # CFG of the evaluation ODE (1.0 = none, as AWM; Flow-GRPO's reference: 4.5)
    v.grid_images = 16  # images in the PNG grid per evaluation, spread over the eval set (0 = none)
    v.on_error = "raise"  # a failing evaluation: "raise" (the step is saved first, exit 4) | "continue"

    c.train = t = ml_collections.ConfigDict()
    t.micro_batch_size = 8  # training micro-batch per device (gradient accumulation inside one step)
    t.max_nonfinite = 3  # stop after this many non-finite (skipped) updates in a row
    t.scan_times = False  # AWM per_time loss: accumulate the K training times one by one (less memory)
    t.steps_per_epoch = 1  # optimizer steps per epoch, each on a shuffled disjoint part of its rollouts
    # (old log-probs from the rollout: Flow-GRPO's steps after the first are off-policy; reference: 2)
    # (with > 1 the kl-EMA adapter, the old/sampling policy of nft, elbo_grpo and off-policy AWM, moves once
    # per epoch, after its last part)

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every = 10  # save every N epochs (loop steps; and at the end / on SIGTERM)
    k.keep = 3  # keep the last k checkpoints
    k.async_save = True  # orbax asynchronous checkpointing
    # when the workdir holds checkpoints and none can be restored: False = stop with an error naming them;
    # True = start again from step 0, bad ones kept as <step>.corrupt, old logs as *.jsonl.before-fresh
    k.allow_fresh_start = False  # start from step 0 when every checkpoint is unusable (CLI: --fresh)
    # resume with changed keys that keep the saved state's meaning (lr, prompts, ...): False = stop, listing
    # them; True = go on, recorded in config_history.jsonl (keys that change the state's meaning: always
    # refused)
    k.allow_config_change = False  # (CLI: --allow-config-change)

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # data-parallel axis size (-1 = all remaining devices)
    ms.fsdp = 1  # parameter-sharded data parallel
    ms.tensor = 1  # tensor parallel
    # at most two of data / fsdp / tensor may be > 1: XLA miscompiles three-axis meshes (parallel.config_mesh
    # refuses them; tests/test_xla_three_axis_mesh.py)
    # batch-shard the blocks' activations (parallel.constrain: per-layer FSDP gathers, BENCHMARKS "TPU plan");
    # off by default: at full size it moved little (gradients equal one device's on two-axis meshes; the wrong
    # gradients once seen with it were the three-axis miscompile)
    ms.constrain_activations = False  # with_sharding_constraint on the residual stream / q,k,v / MLP hidden

    c.compile = cp = ml_collections.ConfigDict()
    # JAX persistent compilation cache (awm_jax.compile_cache), shared by all workdirs: "" = per-user
    # $XDG_CACHE_HOME/awm_jax/jax_cache (else ~/.cache/awm_jax/jax_cache); a path moves it
    cp.cache_dir = ""  # compilation cache directory: "" = the per-user default, a path, or "off"

    c.gpu = gp = ml_collections.ConfigDict()
    # JAX and PyTorch reward models on one GPU (awm_jax.accel_env): when a reward's device is cuda, JAX
    # preallocates only this fraction (XLA_PYTHON_CLIENT_MEM_FRACTION, set before JAX starts; a value you
    # exported wins); JAX's own default is 0.75, which leaves the reward models too little
    gp.jax_mem_fraction = 0.6  # GPU memory fraction JAX preallocates when a reward runs on cuda (0 = JAX's)

    c.log = lg = ml_collections.ConfigDict()
    lg.tensorboard = True  # write TensorBoard event files (tensorboardX; without it: one line, no events)
    # Weights & Biases (awm_jax.logging_wandb; pip install 'awm_jax[wandb]'): scalars, eval tables and grids,
    # the config; "offline" writes a local run (<WANDB_DIR or workdir>/wandb, `wandb sync` uploads it)
    lg.wandb = ""  # "" = off | "online" | "offline"
    lg.wandb_project = "awm-jax"  # W&B project
    lg.wandb_name = ""  # W&B run name ("" = the workdir's folder name)
    lg.wandb_tags = ()  # W&B run tags
    lg.progress = True  # tqdm progress bar with ETA
    return c


def _flow_grpo(c: ml_collections.ConfigDict, task: dict) -> None:
    """The keys where Flow-GRPO differs from AWM (per-step SDE likelihoods, CFG, PPO clip)."""
    c.algorithm = "flow_grpo"
    c.sample.sampler = "sde"
    c.sample.num_steps = 10
    c.sample.noise_level = 0.7
    c.sample.noise_t_min = 0.0
    c.sample.noise_t_max = 1.0
    c.sample.guidance_scale = 4.5  # CFG 4.5 in rollouts and in the training forward passes
    c.flow_grpo.beta = task["grpo_beta"]
    c.eval.guidance_scale = 4.5  # the reference evaluates with its sampling CFG
    c.data.prompts_per_step = 48  # the reference's epoch: 48 prompts x 24 images ...
    c.train.steps_per_epoch = 2  # ... in 2 optimizer steps (gradient_accumulation = batches per epoch / 2)
    c.ema.eval_decay_max = 0.9  # flow_grpo's EMAModuleWrapper(decay=0.9, update_step_interval=8)
    c.ema.eval_every = 8


def _nft(c: ml_collections.ConfigDict) -> None:
    """DiffusionNFT's keys (NVlabs/DiffusionNFT config/nft.py, scripts/train_nft_sd3.py; docs/objectives.md).
    """
    c.algorithm = "nft"
    c.nft.beta = 1.0  # config.beta = 1.0 (geneval, pickscore; 0.1 for ocr)
    c.nft.adaptive_weighting = True  # the script's "adaptive weighting" (always on)
    c.awm.beta = 1e-4  # train.beta: KL to the reference (LoRA disabled), velocity MSE
    c.awm.ema_beta = 0.0  # no kl-EMA term: the adapter is the old policy only
    c.ema.kl_decay_max = 0.5  # old policy: decay_type 1, min(0.001 step, 0.5) (rate = kl_decay_rate)
    c.ema.eval_decay_max = 0.9  # EMAModuleWrapper(decay=0.9) for evaluation


def _nft_sd35(c: ml_collections.ConfigDict) -> None:
    """The SD3.5 rollout / training-time settings of DiffusionNFT."""
    # deterministic DPM2 rollouts, as the authors' config.sample.solver = "dpm2", deterministic = True
    # (NVlabs/DiffusionNFT config/nft.py:65-66; Euler "ode" before issue 30)
    c.sample.sampler = "dpm2"
    c.sample.num_steps = 10  # config.sample.num_steps = 10
    c.sample.noise_level = 0.0  # deterministic
    c.sample.guidance_scale = 1.0  # no CFG in rollouts or training
    c.awm.train_timesteps = 9  # int(num_steps * timestep_fraction) = int(10 * 0.99) grid times per sample
    c.awm.timestep_sampler = "discrete"  # sampler grid times (the authors: 9 of the 10, per-sample order)
    c.awm.timestep_fraction = 0.99  # train.timestep_fraction
    c.data.prompts_per_step = 48  # num_groups = 48 prompts x 24 images


def _elbo(c: ml_collections.ConfigDict, name: str) -> None:
    """The exact-weight ELBO objectives (elbo_exact_*; formerly elbo_*): the AWM setting with the (1 - t) / t
    weighting and another policy-gradient loss. NOT seed 004's objectives (_seed004)."""
    c.algorithm = _EXACT.get(name, name)
    c.awm.weighting = "elbo"  # per-time weight (1 - t) / t of the flow-matching ELBO
    if c.algorithm == "elbo_exact_grpo":
        c.awm.clip_range = 0.2  # PPO clip of the ELBO ratio (on the mean over the K times)


_EXACT = {"elbo_reinforce": "elbo_exact_reinforce", "elbo_grpo": "elbo_exact_grpo"}  # deprecated -> new
SEED004 = ("epg", "pepg", "par", "epg_noratio", "pepg_noratio", "par_noratio", "epg_grpo")


def _seed004(c: ml_collections.ConfigDict, method: str) -> None:
    """Seed 004's ELBO policy gradients as scripts/sd3/sd3_geneval_pepg.sh runs them (the 5 sd3_geneval_*
    scripts differ only in METHOD; docs/objectives.md has the file:line of every value)."""
    c.algorithm = method  # METHOD (sd3_geneval_pepg.sh:35; epg.sh / par.sh the same line)
    c.elbo.likelihood = "adaptive"  # ELBO="adaptive" (sd3_geneval_pepg.sh:41)
    # ADV="exact" (:36): A = BETA (R - mean_prompt) / ALPHA, BETA 1e-4 (:38), ALPHA 1e-3 (:39); grpo asserts
    # ADV="standard" (src/utils/base.py compute_policy_loss), std over all rewards (config/base.py global_std)
    c.advantages.mode = "standard" if method == "epg_grpo" else "exact"
    c.advantages.exact_scale = 0.1  # BETA / ALPHA = 1e-4 / 1e-3
    c.awm.beta = 1e-4  # KL_METHOD="girsanov" (:37) with weight BETA = 1e-4 (:38): 1e-4 mean (v - v_ref)^2
    c.awm.ema_beta = 0.0  # no kl-EMA term: the adapter is the old policy only
    c.awm.kl_elbo = False  # girsanov = plain velocity MSE
    c.ema.kl_decay_rate = 0.001  # DECAY_TYPE=1 (:42): old <- d old + (1 - d) theta, d = min(0.001 step, 0.5)
    c.ema.kl_decay_max = 0.5  # (src/utils/__init__.py return_decay; after every epoch in src/train.py)
    c.ema.eval_decay_max = 0.9  # EMAModuleWrapper(decay=0.9, update_step_interval=1) (src/train.py)
    c.ema.eval_every = 1
    c.optim.max_grad_norm = 5.0  # MAX_GRAD_NORM=5.0 (:43)
    c.train.steps_per_epoch = 1  # GRADIENT_STEP_PER_EPOCH=1 (:44)
    c.sample.guidance_scale = 1.0  # GUIDANCE_SCALE / TRAIN_ / REF_GUIDANCE_SCALE = 1.0 (:45-47): no CFG
    c.eval.guidance_scale = 1.0
    # the sampler's own grid times: per sample a random permutation of the num_steps grid points, the first
    # int(num_steps * timestep_fraction) (config/base.py:132 timestep_fraction = 0.99; src/train.py)
    c.awm.timestep_sampler = "permutation"
    c.awm.timestep_fraction = 0.99
    c.awm.timestep_draw = "sample"
    _seed004_rollouts(c)


def _seed004_rollouts(c: ml_collections.ConfigDict) -> None:
    """config/sd3.py:14-56 (_sd3_ode_base_config): deterministic 10-step rollouts, 9 training times."""
    c.sample.sampler = "dpm2"  # config/sd3.py:52-53: sample.deterministic = True, sample.solver = "dpm2"
    c.sample.noise_level = 0.0  # sample.deterministic = True
    c.sample.num_steps = 10  # config/sd3.py:26-27: num_steps = 10 (eval_num_steps = 40 = our eval.num_steps)
    c.awm.train_timesteps = 9  # int(10 * 0.99)


def _ram(c: ml_collections.ConfigDict, task: str) -> None:
    """RAM as the seed-004 repository's port runs it (src/utils/base.py "ram" branch) on that repository's SD3
    recipe; rho and the advantage normalisation are second-hand (docs/objectives.md)."""
    c.algorithm = "ram"
    c.ram.rho = 1000.0 if task == "pickscore" else 100.0  # second-hand (RAM README / ports): 100 / 1000
    c.advantages.mode = "standard"  # R - group mean over the std of all the step's rewards, no clip
    c.advantages.std_mode = "global"
    c.awm.beta = 0.0  # no KL term: rho is the inverse KL temperature
    c.awm.ema_beta = 0.0
    c.ema.kl_decay_rate = 0.001  # the port's old policy: DECAY_TYPE=1, d = min(0.001 step, 0.5) per epoch
    c.ema.kl_decay_max = 0.5  # (RAM's README: EMA 0.9 with a linear warm-up, second-hand)
    c.ema.eval_decay_max = 0.9
    c.ema.eval_every = 1
    c.optim.max_grad_norm = 5.0  # the seed-004 scripts' MAX_GRAD_NORM (RAM's own: not readable here)
    c.train.steps_per_epoch = 1
    c.sample.guidance_scale = 1.0  # no CFG inside the loss or the rollouts
    c.eval.guidance_scale = 1.0
    c.awm.timestep_sampler = "permutation"  # the port: 9 of the 10 grid times (the paper: K = 8, p(t) = 2t)
    c.awm.timestep_fraction = 0.99
    c.awm.timestep_draw = "sample"
    _seed004_rollouts(c)


def _paper(c: ml_collections.ConfigDict, task: dict) -> None:
    """The AWM paper's settings (Sec. 5): Euler-Maruyama, K=4, w(t)=1, beta 0.4/0.4/0.01, no EMA term."""
    c.sample.sampler = "euler_maruyama"
    c.sample.noise_level = 0.7
    c.sample.noise_t_min = 0.0
    c.sample.noise_t_max = 1.0
    c.awm.train_timesteps = 4
    c.awm.weighting = "uniform"
    c.awm.timestep_sampler = "discrete"
    c.awm.beta = task["paper_beta"]
    c.awm.ema_beta = 0.0


def sd35m(task: str, algorithm: str = "awm", paper: bool = False) -> ml_collections.ConfigDict:
    """SD3.5-Medium config for ``task`` in {geneval, ocr, pickscore}."""
    t = _TASKS[task]
    c = base_config()
    c.lora.targets = SD35_LORA_TARGETS
    c.model.path = "weights/sd3.5-medium"  # the diffusers pipeline folder (tools/fetch_assets.py layout)
    c.model.vae_path = ""  # "" = <path>/vae
    c.model.text_encoder_paths = ("", "", "")  # CLIP-L, CLIP-G, T5: read from the pipeline folder
    # Full-size memory (BENCHMARKS.md, "TPU plan from the compiler"): without activation checkpointing the
    # train step needs ~180 GB of temporaries per chip. Scanned layers + full per-block remat + micro-batch 2
    # fit v5p-8 (22.6 GiB peak) and v6e-8 (20.3 GiB); v5e-16 (16 GB chips) also needs
    # --config.train.micro_batch_size=1 --config.mesh.data=8 --config.mesh.fsdp=2 (12.6 GiB).
    c.model.scan_layers = True
    c.model.remat_policy = "full"
    c.train.micro_batch_size = 2
    c.data.prompts_per_step = t["prompts"]
    c.data.train_format = t["fmt"]
    c.data.eval_format = t["fmt"]
    if task == "geneval":
        c.data.train_prompts = "data/prompts/geneval_train_metadata.jsonl"
        c.data.eval_prompts = "data/prompts/geneval_test_metadata.jsonl"
    elif task == "ocr":
        c.data.train_prompts = "data/prompts/ocr_train.txt"
        c.data.eval_prompts = "data/prompts/ocr_test.txt"
    else:
        c.data.train_prompts = "data/prompts/pickscore_train.txt"
        c.data.eval_prompts = "data/prompts/pickscore_test.txt"
        c.advantages.correct_threshold = 1e9  # no notion of "correct" for a preference score
    c.reward.name = t["reward"]
    c.sample.noise_level = t["noise"]
    c.awm.timestep_sampler = t["ts"]
    c.awm.beta = t["beta"]
    if paper:
        _paper(c, t)
    if algorithm == "flow_grpo":
        _flow_grpo(c, t)
    elif algorithm == "nft":
        _nft(c)
        _nft_sd35(c)
    elif algorithm in ("elbo_reinforce", "elbo_grpo", "elbo_exact_reinforce", "elbo_exact_grpo"):
        _elbo(c, algorithm)
    elif algorithm in SEED004:
        _seed004(c, algorithm)
        c.data.prompts_per_step = 48  # config/sd3.py:31 num_groups = 48 prompts x 24 images (:14) per epoch
        c.max_steps = 360  # MAX_EPOCHS=360 (sd3_geneval_pepg.sh:34)
    elif algorithm == "ram":
        _ram(c, task)
        c.data.prompts_per_step = 48  # the seed-004 recipe (config/sd3.py num_groups)
    elif algorithm != "awm":
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return c


def flux(task: str, algorithm: str = "awm", paper: bool = False) -> ml_collections.ConfigDict:
    """FLUX.1-dev config for ``task`` in {geneval, ocr, pickscore}: the SD3.5-M task config with these keys
    changed (the public AWM code ships no FLUX script; the values follow the AWM paper and Flow-GRPO's
    ``pickscore_flux`` config)."""
    c = sd35m(task, algorithm, paper)
    c.model.kind = "flux"  # the FLUX.1 family (awm_jax.models.flux)
    c.model.arch = "flux.1-dev"  # 19 double + 38 single blocks, 3072 wide, guidance embedding
    c.model.path = "weights/flux.1-dev"  # diffusers FluxPipeline folder (transformer/ may be converted)
    c.model.vae_path = ""  # "" = <path>/vae
    c.model.text_encoder_paths = ("", "")  # CLIP-L, T5-XXL: read from the pipeline folder
    c.model.max_sequence_length = 512  # FLUX's T5 length (FluxPipeline default; SD3.5: 128)
    c.model.guidance = 3.5  # distilled guidance as a model input (no CFG), Flow-GRPO's flux configs
    c.lora.rank = 64  # the paper: LoRA r 64, alpha 128 on FLUX (SD3.5: 32 / 64)
    c.lora.alpha = 128.0
    c.lora.targets = ()  # the family's default: attention + feed-forward projections of both block kinds
    c.sample.guidance_scale = 1.0  # no CFG for FLUX.1-dev, in AWM and in Flow-GRPO
    c.eval.guidance_scale = 1.0
    c.sample.shift = 0.0  # FLUX: 0 = resolution-dependent (dynamic) shift of FLUX.1-dev; schnell: 1.0
    c.eval.num_steps = 28  # FluxPipeline's default and Flow-GRPO's FLUX eval steps (SD3.5: 40)
    if paper:
        c.sample.noise_level = 0.9  # Euler-Maruyama at FLUX's SDE noise level (SD3.5: 0.7)
    if algorithm == "flow_grpo":
        c.sample.num_steps = 6  # Flow-GRPO pickscore_flux: 6 rollout steps (SD3.5: 10)
        c.sample.noise_level = 0.9  # FLUX SDE noise level a (SD3.5: 0.7)
        if task == "pickscore":
            c.flow_grpo.beta = 0.0  # pickscore_flux trains without the KL term
    return c



def toy(algorithm: str = "awm") -> ml_collections.ConfigDict:
    """The embedded shapes world: runs end to end on a 2-core CPU in minutes."""
    c = base_config()
    c.model.kind = "toy"
    c.model.arch = "toy"
    c.model.path = "awm_jax/toy/assets/toy_mmdit"  # pretrained toy checkpoint ("" = random init)
    c.model.dtype = "float32"
    c.model.resolution = 32
    # Toy scaling of the AWM defaults (each measured in benchmarks/results/toy_run.md):
    c.lora.rank = 8  # small model (hidden 64): rank 8 of the attention projections
    c.lora.alpha = 16.0  # scale alpha / r = 2 as the SD3.5 default
    # 1e-3: held-out GenEval 0.156 -> 0.309 in 20 steps; 3e-4: 0.156 -> 0.264 (10-step rollouts, K = 4)
    c.optim.lr = 1e-3
    # The toy world's built-in splits, tag-balanced ("@n": n prompts per tag, cycled): the natural train
    # split is 92/134 color_attr and the held-out one has 1-3 prompts for four of the six tags.
    c.data.train_prompts = "toy:train@balanced"
    c.data.eval_prompts = "toy:heldout@96"
    c.data.train_format = "geneval"
    c.data.eval_format = "geneval"
    c.data.group_size = 8  # images per prompt (advantage group)
    c.data.prompts_per_step = 16  # 128 rollouts per step: more signal per Adam step
    # Rollouts with the deterministic ODE (the evaluation's sampler): gains with SA-Solver (noise 0.4)
    # rollouts did not transfer to the 40-step ODE evaluation (benchmarks/results/toy_run.md).
    c.sample.sampler = "ode"
    c.sample.noise_level = 0.0
    # 20 rollout steps (AWM trains on any sampler's x0): held-out gain at step 20 +0.17 on seeds 0, 1, 2
    # against +0.13..+0.15 with 10 steps (288-image eval), for 1.33x the forward passes per step
    c.sample.num_steps = 20
    c.sample.batch_size = 64
    # K = 6 training times per sample (the public code's default): held-out gain at step 20 +0.17 against
    # +0.13 with the paper's K = 4 (576-image eval, seed 42)
    c.awm.train_timesteps = 6
    c.awm.beta = 0.001
    c.reward.name = "toy_geneval"
    c.eval.every = 5
    c.eval.num_steps = 40
    c.eval.num_prompts = 0  # all 6 x 96 tag-balanced held-out entries (576 images; GenEval: 2212) ...
    c.eval.samples_per_prompt = 1  # ... one image each (repeated prompts get different noise)
    c.eval.grid_images = 48  # 8 per tag
    c.eval.use_ema = False  # the eval EMA lags behind in a 20-step run (and did not stop the drift at 40)
    c.train.micro_batch_size = 64  # gradient accumulation over 2 micro-batches
    c.checkpoint.every = 10
    # 20 steps: with 10-step rollouts and K = 4 the held-out accuracy peaked at steps 15-25 and then drifted
    # down (3 seeds + variants of lr, beta, eval EMA and batch; benchmarks/results/toy_run.md)
    c.max_steps = 20
    c.mesh.data = -1
    if algorithm == "flow_grpo":
        _flow_grpo(c, _TASKS["geneval"])
        c.sample.guidance_scale = 1.0  # the toy text encoder has no empty-prompt embedding
        c.eval.guidance_scale = 1.0
        c.data.prompts_per_step = 16  # the toy's AWM batch and one step per epoch (the comparison harness
        c.train.steps_per_epoch = 1  # adds the reference's 2 steps per epoch as its own method)
    elif algorithm == "nft":
        _nft(c)  # the toy's 20 rollout steps and K = 6 times as AWM ...
        c.sample.sampler = "dpm2"  # ... with the authors' DPM2 (config/nft.py:66; "ode" before issue 30)
    elif algorithm in ("elbo_reinforce", "elbo_grpo", "elbo_exact_reinforce", "elbo_exact_grpo"):
        _elbo(c, algorithm)
    elif algorithm in SEED004:
        _seed004(c, algorithm)  # the authors' rollouts: 10 deterministic steps, 9 of the 10 grid times
    elif algorithm == "ram":
        _ram(c, "geneval")
    elif algorithm != "awm":
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return c
