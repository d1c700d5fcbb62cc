"""Two toy training steps with an on-accelerator reward (a tiny random PickScore-style CLIP): the rollout
collection scores the decoded device images in JAX (rl/collect.py's on_device hook), the loss is finite, the
timeline has a score phase, and the rewards equal the host scorer's on the same images."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from awm_jax import config_lib, rewards, train
from awm_jax.rewards.tiny import save_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy.py")
SEEN: list = []


class _Recording:
    """The accelerator scorer, recording what it scored (the host copy is the test's, for the comparison)."""

    on_device = True

    def __init__(self, **kwargs):
        self.inner = rewards.get("pickscore", **kwargs, device="accelerator")

    def score_device(self, images, prompts, metadata=None):
        r = self.inner.score_device(images, prompts, metadata)
        SEEN.append((np.asarray(images), list(prompts), np.asarray(r)))
        return r

    def __call__(self, images, prompts, metadata=None):
        return self.inner(images, prompts, metadata)


rewards.register("test_device_pickscore")(_Recording)


def test_toy_trains_with_an_on_device_reward(tmp_path):
    clip = save_tiny_clip(str(tmp_path / "clip"), image_size=16, patch=8)  # the toy's 32 px images resized
    c = config_lib.load_config(TOY)
    config_lib.apply_overrides(c, [
        ("model.path", ""), ("max_steps", "2"), ("data.group_size", "4"), ("data.prompts_per_step", "2"),
        ("sample.batch_size", "1"), ("sample.num_steps", "3"), ("train.micro_batch_size", "1"),
        ("eval.every", "0"), ("log.progress", "false"), ("checkpoint.async_save", "false")])
    c.reward.name = "test_device_pickscore"
    c.reward.kwargs = ml_collections.ConfigDict({"model_path": clip})  # not the toy reward's strict keyword
    SEEN.clear()
    last = train.run(c, str(tmp_path / "run"))
    m = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in m] == [1, 2] and last["step"] == 2
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["reward_mean"]) for r in m)
    assert all("time/score" in r and r["time/decode"] == 0 for r in m)  # no host copy of the images
    assert len(SEEN) >= 2 and all(img.shape[1:] == (32, 32, 3) for img, _, _ in SEEN)
    host = rewards.get("pickscore", model_path=clip)
    got = np.concatenate([r for _, _, r in SEEN])
    want = np.concatenate([host(img, p) for img, p, _ in SEEN])
    err = np.abs(got - want).max()
    print(f"toy on-device pickscore vs host: max |diff| {err:.2e} over {got.size} images")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the logged reward statistics are those of the on-device rewards
    per_step = len(got) // 2
    assert np.isclose(m[0]["reward_mean"], got[:per_step].mean(), atol=1e-5)
