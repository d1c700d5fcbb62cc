"""Group advantages, clipping and reward statistics vs straightforward numpy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.rl import awm_clip_advantages, group_advantages, grpo_clip_advantages, reward_stats


def _loop(rewards, groups, global_std):
    out = np.zeros_like(rewards)
    for g in set(groups.tolist()):
        m = groups == g
        std = rewards.std() if global_std else rewards[m].std()
        out[m] = (rewards[m] - rewards[m].mean()) / (std + 1e-4)
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_match_loop(global_std):
    rng = np.random.RandomState(0)
    rewards = rng.rand(48)
    prompts = np.array([f"prompt {i % 6}" for i in rng.permutation(48)])
    a = group_advantages(rewards, prompts, global_std=global_std)
    assert a.shape == (48,)
    np.testing.assert_allclose(a, _loop(rewards, prompts, global_std), rtol=1e-12)
    # each group's advantages sum to zero
    for p in set(prompts.tolist()):
        assert abs(a[prompts == p].sum()) < 1e-9
    # jax inputs and integer ids give the same result
    ids = np.array([int(p.split()[1]) for p in prompts])
    np.testing.assert_allclose(group_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(ids),
                                                global_std=global_std), a, rtol=2e-4, atol=2e-4)


def test_group_advantages_zero_std_group_and_errors():
    r = np.array([1.0, 1.0, 0.0, 1.0])
    a = group_advantages(r, np.array([0, 0, 1, 1]), global_std=False)
    np.testing.assert_array_equal(a[:2], 0.0)
    assert a[2] < 0 < a[3]
    with pytest.raises(ValueError, match="shape"):
        group_advantages(r, np.array([0, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(np.array([1.0, np.nan]), np.array([0, 0]))


def test_clipping():
    a = np.array([-7.0, -5.0, 0.0, 2.5, 9.0])
    np.testing.assert_allclose(awm_clip_advantages(a, 5.0, 1.0), [-1, -1, 0, 0.5, 1])
    np.testing.assert_allclose(awm_clip_advantages(jnp.asarray(a), 5.0, 2.0), [-2, -2, 0, 1, 2])
    c, mask = grpo_clip_advantages(a, 5.0)
    np.testing.assert_allclose(c, [-5, -5, 0, 2.5, 5])
    np.testing.assert_array_equal(mask, [True, True, False, True, True])
    with pytest.raises(ValueError, match="clip"):
        awm_clip_advantages(a, 0.0)


def test_reward_stats():
    r = np.array([1, 1, 0, 0, 1, 0, 0.5, 0.5])
    g = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    st = reward_stats(r, g, correct_threshold=1.0)
    assert st["reward_mean"] == pytest.approx(r.mean()) and st["reward_std"] == pytest.approx(r.std())
    assert st["zero_std_frac"] == pytest.approx(3 / 4)
    assert st["all_correct_frac"] == pytest.approx(1 / 4)
    assert st["all_wrong_frac"] == pytest.approx(2 / 4)
    st = reward_stats(r, g, correct_threshold=0.5)
    assert st["all_correct_frac"] == pytest.approx(2 / 4) and st["all_wrong_frac"] == pytest.approx(1 / 4)


def test_stat_tracker_history_and_clear():
    from awm_jax.rl import PerPromptStatTracker

    rng = np.random.RandomState(4)
    r1, r2 = rng.rand(8), rng.rand(8)
    p = np.array(["a", "b"] * 4)
    tr = PerPromptStatTracker(global_std=True)
    np.testing.assert_allclose(tr.update(p, r1), group_advantages(r1, p), rtol=1e-12)
    a2 = tr.update(p, r2)  # baseline now uses both epochs' rewards of the prompt
    for q in ("a", "b"):
        m = p == q
        hist = np.concatenate([r1[m], r2[m]])
        np.testing.assert_allclose(a2[m], (r2[m] - hist.mean()) / (r2.std() + 1e-4), rtol=1e-12)
    tr.clear()
    np.testing.assert_allclose(tr.update(p, r2), group_advantages(r2, p), rtol=1e-12)
    tg = PerPromptStatTracker(global_std=False)
    np.testing.assert_allclose(tg.update(p, r1), group_advantages(r1, p, global_std=False), rtol=1e-12)
