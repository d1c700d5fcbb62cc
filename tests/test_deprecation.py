"""Deprecated aliases of removed public names: the old name still works, is the replacement (or computes what
it computed), and warns with a DeprecationWarning naming the replacement."""

import importlib

import numpy as np
import pytest

from awm_jax import deprecation


@pytest.mark.parametrize("module,name", [(m, n) for m, names in deprecation.MOVED.items() for n in names])
def test_every_alias_resolves_and_warns(module, name):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{module}.{name} is deprecated: use "):
        obj = getattr(mod, name)
    target = deprecation.MOVED[module][name]
    new_mod, new_name = target.split(":")
    assert obj is getattr(importlib.import_module(new_mod), new_name)
    assert name not in vars(mod), "an alias must not shadow a live name"


def test_sd3_grid_is_shifted_grid():
    from awm_jax import sampling

    with pytest.warns(DeprecationWarning, match="awm_jax.sampling.schedules.shifted_grid"):
        grid = sampling.sd3_grid(10, 3.0)
    np.testing.assert_array_equal(grid, sampling.shifted_grid(10, 3.0))
    with pytest.raises(AttributeError, match="no_such_name"):
        sampling.no_such_name  # noqa: B018


def test_sample_final_equals_the_new_dispatch():
    import jax
    import jax.numpy as jnp

    from awm_jax import sampling

    v = lambda x, t: -x * (1.0 + t[:, None])  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (2, 3))
    with pytest.warns(DeprecationWarning, match="sampling.sample"):
        old = sampling.sample_final("ode", v, jax.random.key(1), x, num_steps=4, shift=3.0)
    new = sampling.sample("ode", v, jax.random.key(1), x, sampling.shifted_grid(4, 3.0))["x0"]
    np.testing.assert_allclose(np.asarray(old), np.asarray(new))
    assert jnp.all(jnp.isfinite(old))


def test_toy_scores_equal_score_detections():
    from awm_jax.toy import reward, shapes

    meta = shapes.parse_split_spec("heldout@1")[0]
    dets = {}
    with pytest.warns(DeprecationWarning):
        ok, why = reward.strict_correct(dets, meta)
    with pytest.warns(DeprecationWarning):
        part = reward.partial_score(dets, meta)
    want = reward.score_detections(dets, meta)
    assert (ok, part, why) == want
