"""Import ``open_clip`` for the parity tests, also where ``torchvision`` cannot be imported.

open_clip imports torchvision at module level for its image transforms (``open_clip/transform.py``) and
``FrozenBatchNorm2d`` (``open_clip/utils.py``); the CLIP forward the tests compare against uses neither.
On this project's CPU set-up (``torch==2.13.0+cpu``) the only torchvision wheels on the index are CUDA builds
that fail to load (``torchvision::nms does not exist``), so when torchvision is unusable this registers an
inert ``torchvision`` module exposing just those names (calling any of them raises) before importing
open_clip. With a working torchvision the real one is used.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types


def _inert(name: str):
    def fail(*_a, **_k):
        raise RuntimeError(f"torchvision is not usable here; {name} was called (open_clip_import shim)")

    return type(name, (), {"__init__": fail, "__call__": fail})


def _install_shim() -> None:
    names = {
        "torchvision": [],
        "torchvision.transforms": [
            "Normalize",
            "Compose",
            "RandomResizedCrop",
            "InterpolationMode",
            "ToTensor",
            "Resize",
            "CenterCrop",
            "ColorJitter",
            "Grayscale",
        ],
        "torchvision.transforms.functional": [],
        "torchvision.ops": [],
        "torchvision.ops.misc": ["FrozenBatchNorm2d"],
    }
    for mod, attrs in names.items():
        m = types.ModuleType(mod)
        m.__spec__ = importlib.machinery.ModuleSpec(mod, None)  # find_spec works; no distribution metadata
        m.__path__ = []  # a package, so submodules resolve through sys.modules
        for a in attrs:
            setattr(m, a, _inert(a))
        sys.modules[mod] = m
    import enum

    modes = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS")  # default args
    sys.modules["torchvision.transforms"].InterpolationMode = modes
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    sys.modules["torchvision"].ops = sys.modules["torchvision.ops"]
    sys.modules["torchvision.ops"].misc = sys.modules["torchvision.ops.misc"]


def import_open_clip():
    """The ``open_clip`` module. Without open-clip-torch the calling test fails, naming the install: the
    README's test command installs it (``--no-deps``), and a skipped oracle test would check nothing."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("open_clip") is None:
        pytest.fail("open-clip-torch is not installed; the README's test command installs it: "
                    "pip install --no-deps open-clip-torch ftfy wcwidth", pytrace=False)
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or a CUDA build that cannot load on a CPU torch
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        import transformers  # noqa: F401 -- settles its torchvision probe before the shim exists

        _install_shim()
    import open_clip

    return open_clip
