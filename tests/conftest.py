"""Test-wide settings: offline, 8 virtual CPU devices, deterministic host threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache of the trainer / sampler: a throwaway dir, never the user's home
import tempfile  # noqa: E402

os.environ.setdefault("AWM_JAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="awm_jax_test_jax_cache_"))
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The ../shared folder beside the checkout (prompt sets, reference)."""
    if not SHARED.exists():
        raise FileNotFoundError(f"expected the shared folder at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
