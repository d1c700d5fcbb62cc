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
DATA = pathlib.Path(__file__).resolve().parent / "data"
# name -> (the full public set, in ../shared when the checkout has it; the project's own small sample)
PROMPT_SETS = {
    "geneval_test": ("data/prompts/geneval_test_metadata.jsonl", "prompts/geneval_sample.jsonl"),
    "ocr_test": ("data/prompts/ocr_test.txt", "prompts/ocr_sample.txt"),
}


@pytest.fixture(scope="session")
def prompt_set():
    """``prompt_set(name) -> (path, full)``: the full public prompt set from ``../shared`` where the checkout
    has it (CI does), else the project's small sample in ``tests/data/prompts`` (a plain clone)."""

    def get(name: str) -> tuple[pathlib.Path, bool]:
        full, sample = PROMPT_SETS[name]
        if (SHARED / full).is_file():
            return SHARED / full, True
        return DATA / sample, False

    return get


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
