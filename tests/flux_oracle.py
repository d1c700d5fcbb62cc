"""The diffusers FLUX oracle with correctly rounded timestep frequencies (shared by the FLUX tests).

torch's float32 CPU ``exp`` is not correctly rounded (3 of FLUX's 128 timestep frequencies are 1 ulp off on
the development machine), and ``sin(1000 * g * f)`` turns 1 ulp of ``f`` into ~1e-4 of the embedding at
guidance 3.5 / t near 1, about 1.5e-5 of a random tiny model's output. The Flax model uses correctly rounded
frequencies (deterministic, unlike libm), so the strict parity checks give diffusers the same ones through
:func:`oracle`; everything else is diffusers' own code. Tests also bound the error against pristine diffusers.
"""

import contextlib
import math

import numpy as np
import pytest
import torch


def exact_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                             scale=1, max_period=10000):
    """diffusers' ``get_timestep_embedding`` formula with correctly rounded frequencies ``exp(exponent)``."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - downscale_freq_shift)
    freqs = torch.from_numpy(np.exp(exponent.numpy().astype(np.float64)).astype(np.float32))
    emb = scale * (timesteps[:, None].float() * freqs[None, :])
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb


@contextlib.contextmanager
def oracle(exact_freqs=True):
    """no_grad, and (by default) diffusers with correctly rounded timestep frequencies."""
    import diffusers.models.embeddings as embeddings

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        if exact_freqs:
            mp.setattr(embeddings, "get_timestep_embedding", exact_timestep_embedding)
        yield
