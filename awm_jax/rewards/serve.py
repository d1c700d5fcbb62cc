"""Serve a registered reward scorer over HTTP, so it can live in its own environment or on another machine.

    python -m awm_jax.rewards.serve --reward geneval --port 8100 [--host 0.0.0.0] \\
        [--config configs/sd35m_geneval.py] [--config.reward.<key>=VALUE ...]

The scorer is built as the trainer builds it (``awm_jax.rewards.from_config``: the reward's config section
and ``reward.kwargs``, in ``reward.workers`` worker processes) from ``--config`` with the overrides; without
``--config`` only ``--config.reward.kwargs.NAME=VALUE`` (the scorer's keywords, JSON or text),
``--config.reward.workers`` and ``--config.reward.worker_threads`` apply. ``--reward`` may also be
``package.module:factory``. ``--port 0`` picks a free port; the first line on stdout names the address:
``awm_jax.rewards.serve: serving 'NAME' on http://HOST:PORT``.

Protocol (aiohttp; no pickle on the wire, ``awm_jax.rewards.remote`` is the client):

- ``GET /health`` -> JSON ``{"status": "ok", "reward": NAME, "evaluate": bool, "pid": int, "scored": rows}``.
- ``POST /score`` and ``POST /evaluate``, body: an ``.npz`` (``numpy.savez``, loaded with
  ``allow_pickle=False``) holding ``images`` (uint8 (B, H, W, 3)) and ``request``: the UTF-8 bytes (uint8
  array) of the JSON ``{"prompts": [B strings], "metadata": [B dicts]}``. Answer: JSON ``{"rewards": [B
  floats]}``, or for ``/evaluate`` ``{"result": {key: value}}`` with numpy arrays as ``{"ndarray": list,
  "dtype": str}`` (see :func:`encode_result`). A bad request is HTTP 400, a scorer failure HTTP 500, both with
  ``{"error": message}``.

Requests are scored one at a time (a lock; the scorer runs on a thread so ``/health`` keeps answering).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["decode_request", "decode_result", "encode_request", "encode_result", "main", "make_app"]


def encode_request(images: np.ndarray, prompts: list, metadata: list) -> bytes:
    """The ``.npz`` body of a ``/score`` or ``/evaluate`` request."""
    req = json.dumps({"prompts": list(prompts), "metadata": list(metadata)}).encode()
    buf = io.BytesIO()
    np.savez(buf, images=np.ascontiguousarray(images, np.uint8), request=np.frombuffer(req, np.uint8))
    return buf.getvalue()


def decode_request(body: bytes) -> tuple[np.ndarray, list, list]:
    """``(images, prompts, metadata)`` of a request body; ``ValueError`` naming what is wrong."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            images, req = z["images"], json.loads(z["request"].tobytes().decode())
    except Exception as e:  # noqa: BLE001 - any malformed body is the client's error (HTTP 400)
        raise ValueError(f"body is not an .npz with 'images' and a JSON 'request' ({type(e).__name__}: "
                         f"{e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    prompts, metadata = req.get("prompts"), req.get("metadata")
    if not isinstance(prompts, list) or len(prompts) != len(images):
        raise ValueError(f"request needs 'prompts', a list of {len(images)} strings")
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or len(metadata) != len(images):
        raise ValueError(f"request 'metadata' must be a list of {len(images)} dicts")
    return images, prompts, metadata


def encode_result(result: dict) -> dict:
    """An ``evaluate`` result as JSON: arrays -> ``{"ndarray": list, "dtype": str}``."""
    out = {}
    for k, v in result.items():
        if isinstance(v, np.ndarray):
            out[k] = {"ndarray": v.tolist(), "dtype": str(v.dtype)}
        elif isinstance(v, (list, tuple)):
            out[k] = [x.item() if isinstance(x, np.generic) else x for x in v]
        else:
            out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def decode_result(data: dict) -> dict:
    """Inverse of :func:`encode_result`."""
    return {k: np.asarray(v["ndarray"], v["dtype"]) if isinstance(v, dict) and "ndarray" in v else v
            for k, v in data.items()}


def make_app(scorer: Any, name: str):
    """The aiohttp application serving ``scorer``."""
    from aiohttp import web

    lock = threading.Lock()
    state = {"scored": 0}

    def run(method: str, images, prompts, metadata):
        with lock:
            if method == "evaluate":
                out = {"result": encode_result(scorer.evaluate(images, prompts, metadata))}
            else:
                r = np.asarray(scorer(images, prompts, metadata), np.float32)
                if r.shape != (len(prompts),):
                    raise ValueError(f"the scorer returned shape {r.shape} for {len(prompts)} images")
                out = {"rewards": [float(x) for x in r]}  # JSON floats: NaN/inf go out as NaN/Infinity
            state["scored"] += len(prompts)
            return out

    async def health(request):
        return web.json_response({"status": "ok", "reward": name, "evaluate": hasattr(scorer, "evaluate"),
                                  "pid": os.getpid(), "scored": state["scored"]})

    async def handle(request, method: str):
        try:
            images, prompts, metadata = decode_request(await request.read())
        except ValueError as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)
        if method == "evaluate" and not hasattr(scorer, "evaluate"):
            return web.json_response({"error": f"reward {name!r} has no evaluate()"}, status=400)
        try:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(None, run, method, images, prompts, metadata)
        except Exception as e:  # noqa: BLE001 - the scorer's failure, named for the client
            return web.json_response({"error": f"reward {name!r} failed: {type(e).__name__}: {e}"},
                                     status=500)
        return web.json_response(out)

    async def score(request):
        return await handle(request, "score")

    async def evaluate(request):
        return await handle(request, "evaluate")

    app = web.Application(client_max_size=1 << 31)
    app.add_routes([web.get("/health", health), web.post("/score", score), web.post("/evaluate", evaluate)])
    return app


def _config(path: str | None, overrides: list[tuple[str, str]], reward: str):
    """The trainer config (``--config``) or a reward-only one, with the overrides; ``reward.name`` set."""
    import ml_collections

    from awm_jax import config_lib

    if path:
        config = config_lib.load_config(path)
        config_lib.apply_overrides(config, overrides)
    else:
        config = ml_collections.ConfigDict({"reward": {"kwargs": {}, "workers": 1, "worker_threads": 0}})
        for key, text in overrides:
            if key.startswith("reward.kwargs."):
                try:
                    value = json.loads(text)
                except ValueError:
                    value = text
                config.reward.kwargs[key[len("reward.kwargs."):]] = value
            elif key in ("reward.workers", "reward.worker_threads"):
                config.reward[key.split(".")[1]] = int(text)
            else:
                raise config_lib.ConfigError(f"--config.{key}: without --config only reward.kwargs.NAME, "
                                             "reward.workers and reward.worker_threads can be set")
    config.reward.name = reward
    return config


def build_scorer(config, full: bool) -> Any:
    """The scorer of ``config.reward``, in-process or in a worker pool, never remote; ``full``: ``config``
    is a trainer config (``--config``), else a reward-only one."""
    from awm_jax import rewards
    from awm_jax.rewards import pool

    if full:  # the trainer's own construction
        config.reward.remote = ()
        return rewards.from_config(config)
    kwargs = config.reward.kwargs.to_dict()
    workers = pool.resolve_workers(config.reward.workers, name=config.reward.name)
    if workers > 1:
        return pool.ScorerPool(config.reward.name, workers=workers, threads=config.reward.worker_threads,
                               **kwargs)
    return rewards.get(config.reward.name, **kwargs)


def main(argv=None) -> int:
    """CLI; serves until interrupted. Returns 2 on bad input."""
    from awm_jax import config_lib
    from awm_jax.rewards.base import RewardConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m awm_jax.rewards.serve", description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help="registered reward name (or package.module:factory)")
    p.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    args, rest = p.parse_known_args(argv)
    try:
        has_config = any(a == "--config" or a.startswith("--config=") for a in rest)
        path, _, overrides = config_lib.parse_args(rest + ([] if has_config else ["--config", ""])
                                                   + ["--workdir", "serve"])
        config = _config(path or None, overrides, args.reward)
        scorer = build_scorer(config, bool(path))
    except (config_lib.ConfigError, RewardConfigError, KeyError, ImportError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    from aiohttp import web

    async def serve():
        runner = web.AppRunner(make_app(scorer, args.reward), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"awm_jax.rewards.serve: serving {args.reward!r} on http://{args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
