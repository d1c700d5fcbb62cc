"""CLIP-family rewards on the accelerator: PickScore, HPSv2.1, LAION aesthetic and CLIPScore, in one jit.

A :class:`DeviceCLIPScorer` holds a Flax CLIP (``awm_jax.models.clip``; transformers folders or open_clip
checkpoints), the processor's preprocessing (``awm_jax.rewards.clip_preprocess``, bit-exact with the PIL
``CLIPImageProcessor`` on square images) and the reward's head. ``score_device(images, prompts)`` takes the
decoded uint8 images ``(B, H, W, 3)`` *as a device array* (sharded over the batch as the VAE decode leaves
them), tokenises the prompts on the host (the CLIP tokenizer of the processor folder, padded to the text
context) and runs preprocessing, both towers and the reward in one ``jax.jit``: the images never leave the
device, only the (B,) rewards do. The model parameters are replicated over the images' mesh once.

Declaring ``on_device = True`` is the hook ``awm_jax.rl.collect.rollout_epoch`` looks for (it then skips the
host copy of the images for scoring). ``__call__(images, prompts, metadata)`` keeps the ordinary scorer
contract (numpy in, numpy (B,) out) for evaluation and the reward bridge.

Rewards (the host scorers' formulas, same tolerance): ``pickscore`` ``exp(logit_scale) * cos / scale``;
``hps`` ``cos`` (HPSv2's ``score.py``: the diagonal of normalised ``image_features @ text_features.T``);
``clipscore`` ``weight * max(cos, 0)`` (Hessel et al. 2021, w = 2.5); ``aesthetic`` the LAION MLP head
(``rewards/aesthetic.py``) on the L2-normalised image embedding. ``dtype="float32"`` traces the program with
``jax.default_matmul_precision("highest")`` so TPU matmuls are not silently bfloat16.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from awm_jax.models import clip as fclip
from awm_jax.rewards.base import RewardConfigError, check_batch, check_dir
from awm_jax.rewards.clip_preprocess import PreprocessSpec, clip_preprocess

KINDS = ("pickscore", "hps", "clipscore", "aesthetic")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_tokenizer(path: str, who: str):
    """The CLIP tokenizer of a processor / model folder (transformers ``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    path = check_dir(path, f"{who} processor_path")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any load failure is a config error naming the folder
        raise RewardConfigError(f"{who}: cannot load a CLIP tokenizer from {path!r}: {e}") from e


def head_arrays(path: str, dim: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The aesthetic MLP head's ``[(kernel (in, out), bias)]`` (validated by ``aesthetic.load_head``)."""
    from awm_jax.rewards.aesthetic import load_head

    head = load_head(path, dim)
    linears = [m for m in head.layers if hasattr(m, "weight")]
    return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears]


class DeviceCLIPScorer:
    """A CLIP reward computed on the accelerator; see the module docstring.

    Args:
      model: the Flax CLIP. spec: the image preprocessing. tokenizer: a transformers CLIP tokenizer (None for
      ``aesthetic``, which ignores prompts). kind: one of :data:`KINDS`. scale: PickScore's divisor.
      weight: CLIPScore's ``w``. head: aesthetic ``[(kernel, bias)]``. dtype: compute dtype name.
    """

    on_device = True

    def __init__(
        self,
        model: fclip.CLIPModel,
        spec: PreprocessSpec,
        tokenizer: Any,
        kind: str,
        *,
        scale: float = 26.0,
        weight: float = 2.5,
        head: list | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ):
        if kind not in KINDS:
            raise RewardConfigError(f"device CLIP scorer: kind {kind!r}; expected one of {KINDS}")
        if dtype not in DTYPES:
            raise RewardConfigError(f"{kind}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if kind != "aesthetic" and tokenizer is None:
            raise RewardConfigError(f"{kind}: a tokenizer is required")
        if kind == "aesthetic" and not head:
            raise RewardConfigError("aesthetic: the MLP head is required")
        self.kind, self.name = kind, name or kind
        self.graphdef, self.state = nnx.split(model)
        self.spec, self.tokenizer, self.context = spec, tokenizer, int(model.config.max_positions)
        self.scale, self.weight, self.dtype = float(scale), float(weight), dtype
        self.head = [(jnp.asarray(k), jnp.asarray(b)) for k, b in head] if head else None
        self._placed: dict = {}
        self._fn = jax.jit(self._score)

    # -- the jitted program ------------------------------------------------------------------
    def _score(self, state, head, images, ids):
        precision = "highest" if self.dtype == "float32" else "default"
        with jax.default_matmul_precision(precision):
            model = nnx.merge(self.graphdef, state)
            pix = clip_preprocess(images, self.spec).astype(DTYPES[self.dtype])
            img = fclip.normalize(model.image_features(pix))
            if self.kind == "aesthetic":
                x = img
                for k, b in head:  # Linear layers only (the public head has no non-linearities)
                    x = jnp.dot(x, k) + b
                return x[:, 0].astype(jnp.float32)
            txt = fclip.normalize(model.text_features(ids))
            cos = jnp.sum(img * txt, axis=-1)
            if self.kind == "pickscore":
                return jnp.exp(model.logit_scale[...].astype(jnp.float32)) * cos / self.scale
            if self.kind == "clipscore":
                return self.weight * jnp.maximum(cos, 0.0)
            return cos

    # -- host side -----------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """int32 ``(B, context)`` token ids (end-of-text, then padding; truncated to the context)."""
        if self.tokenizer is None:
            return np.zeros((len(prompts), 1), np.int32)
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.context, return_tensors="np"
        )
        return np.asarray(tok["input_ids"], np.int32)

    def _place(self, images: jax.Array, ids: np.ndarray):
        """Replicate the parameters over the images' mesh (once) and shard the token ids like the images."""
        sharding = getattr(images, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return self.state, self.head, jnp.asarray(ids)
        mesh = sharding.mesh
        if mesh not in self._placed:
            rep = NamedSharding(mesh, PartitionSpec())
            self._placed[mesh] = jax.device_put((self.state, self.head), rep)
        state, head = self._placed[mesh]
        spec = PartitionSpec(sharding.spec[0] if len(sharding.spec) else None)
        ids_sh = NamedSharding(mesh, spec)
        if jax.process_count() > 1:  # this host's rows -> one global array (as the images are)
            ids = jax.make_array_from_process_local_data(ids_sh, ids)
        else:
            ids = jax.device_put(ids, ids_sh)
        return state, head, ids

    def score_device(self, images: jax.Array, prompts, metadata=None) -> jax.Array:
        """Rewards ``(B,)`` float32 as a device array (dispatched, not waited for). ``images``: uint8
        ``(B, H, W, 3)``; ``prompts``: this host's rows' prompts (all of them on one host)."""
        del metadata
        images = images if isinstance(images, jax.Array) else jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
            raise ValueError(
                f"{self.name}: images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}"
            )
        state, head, ids = self._place(images, self.tokenize(list(prompts)))
        return self._fn(state, head, images, ids)

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """The ordinary scorer contract: uint8 numpy ``(B, H, W, 3)`` -> float32 numpy ``(B,)``."""
        images, prompts, _ = check_batch(images, prompts, metadata, self.name)
        return np.asarray(self.score_device(jnp.asarray(images), prompts), np.float32)


# ----------------------------------------------------------------------------------------------------
# builders (the registry's factories in awm_jax.rewards.clip_rewards call these for device="accelerator")
# ----------------------------------------------------------------------------------------------------


def _spec(path: str, who: str) -> PreprocessSpec:
    return PreprocessSpec.from_folder(check_dir(path, f"{who} processor_path"))


def _load(path: str, who: str, dtype: str, open_clip_arch=None) -> fclip.CLIPModel:
    """The Flax CLIP with float32 parameters computing in ``dtype`` (bfloat16: matmuls in bfloat16; softmax,
    norm statistics and the final L2 norms stay float32)."""
    from awm_jax.convert import ConversionError

    if dtype not in DTYPES:
        raise RewardConfigError(f"{who}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    compute = None if dtype == "float32" else DTYPES[dtype]
    try:
        return fclip.load(path, open_clip_arch=open_clip_arch, dtype=compute)
    except ConversionError as e:
        raise RewardConfigError(f"{who}: cannot load the CLIP weights: {e}") from e


def pickscore(
    model_path: str, processor_path: str | None = None, scale: float = 26.0, dtype: str = "float32"
) -> DeviceCLIPScorer:
    proc = processor_path or model_path
    return DeviceCLIPScorer(
        _load(check_dir(model_path, "pickscore model_path"), "pickscore", dtype),
        _spec(proc, "pickscore"),
        load_tokenizer(proc, "pickscore"),
        "pickscore",
        scale=scale,
        dtype=dtype,
    )


def clipscore(
    model_path: str, processor_path: str | None = None, weight: float = 2.5, dtype: str = "float32"
) -> DeviceCLIPScorer:
    proc = processor_path or model_path
    return DeviceCLIPScorer(
        _load(check_dir(model_path, "clipscore model_path"), "clipscore", dtype),
        _spec(proc, "clipscore"),
        load_tokenizer(proc, "clipscore"),
        "clipscore",
        weight=weight,
        dtype=dtype,
    )


def hps(checkpoint_path: str, processor_path: str, arch: Any = "ViT-H-14", dtype: str = "float32"):
    return DeviceCLIPScorer(
        _load(checkpoint_path, "hps", dtype, open_clip_arch=arch),
        _spec(processor_path, "hps"),
        load_tokenizer(processor_path, "hps"),
        "hps",
        dtype=dtype,
    )


def aesthetic(clip_path: str, head_path: str, processor_path: str | None = None, dtype: str = "float32"):
    model = _load(check_dir(clip_path, "aesthetic clip_path"), "aesthetic", dtype)
    head = head_arrays(head_path, int(model.config.projection_dim))
    return DeviceCLIPScorer(
        model, _spec(processor_path or clip_path, "aesthetic"), None, "aesthetic", head=head, dtype=dtype
    )
