"""Client of reward servers (``python -m awm_jax.rewards.serve``): an ordinary scorer over HTTP endpoints.

``RemoteScorer(["http://host:port", ...], name=..., timeout_s=..., retries=...)`` is a scorer
``(images uint8 (B,H,W,3), prompts, metadata) -> float32 (B,)`` (with ``evaluate`` where the servers'
scorer has one), so the reward bridge treats it like a local one. The trainer builds it when
``reward.remote`` lists endpoints (``awm_jax.rewards.from_config``).

- **Spread.** A batch is split into one contiguous chunk per live endpoint, sent concurrently (one thread per
  endpoint; the wire format is ``serve``'s: an ``.npz`` body with a JSON request, JSON back, no pickle).
- **Endpoint failures.** A connection error, a timeout (``timeout_s`` per request) or an HTTP 5xx that is not
  the scorer's own error marks the endpoint dead for this call, and its chunk is re-sent to a live endpoint.
  Dead endpoints are probed again (``GET /health``) at the start of the next call.
- **Scorer failures.** The server's scorer raising (HTTP 500 with its message) is retried ``retries`` times
  on any live endpoint, then raised.
- **Named errors.** Every ``RewardError`` names the endpoint(s), what happened there and the prompts of the
  chunk; a batch with no live endpoint left stops with ``RewardError("... all N reward endpoints are
  down ...")`` listing each one's last error.
- **Nothing scored twice.** Each chunk's rewards are taken from exactly one answer: a chunk is only re-sent
  after its request failed, and a late answer to a failed request is never read.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from awm_jax.rewards.base import RewardConfigError, RewardError
from awm_jax.rewards.serve import decode_result, encode_request

__all__ = ["EndpointDown", "RemoteScorer", "ScorerFailed"]


class EndpointDown(RuntimeError):
    """The endpoint did not answer (connection refused / reset, timeout, a non-scorer HTTP error)."""


class ScorerFailed(RuntimeError):
    """The endpoint answered that its scorer failed (HTTP 500 with the scorer's message) or rejected input."""


def _preview(prompts, limit: int = 4) -> str:
    shown = ", ".join(repr(str(p)[:80]) for p in list(prompts)[:limit])
    more = len(prompts) - limit
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"


def _url(u: Any) -> str:
    u = str(u).strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise RewardConfigError(f"config key 'reward.remote': {u!r} is not an http:// or https:// address")
    return u


class RemoteScorer:
    """Scores over the reward servers at ``urls``; see the module docstring. ``name``: the reward every
    server must serve (checked on ``/health``; "" = any); ``timeout_s``: per request; ``retries``: extra
    attempts of a chunk whose scorer failed; ``connect_timeout_s``: the health probes' timeout."""

    def __init__(self, urls, name: str = "", timeout_s: float = 600.0, retries: int = 2,
                 connect_timeout_s: float = 10.0):
        self.urls = [_url(u) for u in (urls or [])]
        if not self.urls:
            raise RewardConfigError("config key 'reward.remote' is empty: no reward endpoint to score on")
        if float(timeout_s) <= 0 or int(retries) < 0:
            raise RewardConfigError(f"reward remote: timeout_s must be > 0 and retries >= 0, got "
                                    f"{timeout_s!r}, {retries!r}")
        self.expected, self.timeout_s, self.retries = str(name or ""), float(timeout_s), int(retries)
        self.connect_timeout_s = float(connect_timeout_s)
        self.name = f"remote {self.expected or 'reward'} ({len(self.urls)} endpoints)"
        self._errors: dict[str, str] = {}
        self._alive: dict[str, bool] = {}
        self._info: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="reward-remote")
        self._probe(self.urls)
        if not any(self._alive.values()):
            raise RewardConfigError(f"reward remote: no endpoint answers: {self._down()}")

    # -- endpoints -----------------------------------------------------------------------
    def _probe(self, urls) -> None:
        for u in urls:
            try:
                with urllib.request.urlopen(f"{u}/health", timeout=self.connect_timeout_s) as resp:
                    info = json.loads(resp.read())
            except Exception as e:  # noqa: BLE001 - any failure to answer marks the endpoint down
                self._alive[u], self._errors[u] = False, f"health check failed: {type(e).__name__}: {e}"
                continue
            if self.expected and info.get("reward") != self.expected:
                raise RewardConfigError(f"reward remote: endpoint {u} serves reward {info.get('reward')!r}, "
                                        f"not the configured {self.expected!r}")
            self._alive[u], self._info[u] = True, info
            self._errors.pop(u, None)

    def _down(self) -> str:
        return "; ".join(f"{u} ({self._errors.get(u, 'down')})" for u in self.urls if not self._alive.get(u))

    def _post(self, url: str, method: str, images, prompts, metadata) -> Any:
        body = encode_request(images, prompts, metadata)
        req = urllib.request.Request(f"{url}/{method}", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", "")
            except Exception:  # noqa: BLE001 - not our server's JSON: the endpoint is broken
                msg = ""
            if msg and e.code in (400, 500):
                raise ScorerFailed(f"HTTP {e.code}: {msg}") from None
            raise EndpointDown(f"HTTP {e.code} {e.reason}") from None
        except Exception as e:  # noqa: BLE001 - refused, reset, timed out, half-closed
            raise EndpointDown(f"{type(e).__name__}: {e}") from None
        if method == "evaluate":
            return decode_result(data["result"])
        r = np.asarray(data["rewards"], np.float32)
        if r.shape != (len(prompts),):
            raise ScorerFailed(f"returned {r.shape[0] if r.ndim else r} rewards for {len(prompts)} images")
        return r

    # -- scoring -------------------------------------------------------------------------
    def _run(self, method: str, images, prompts, metadata) -> list[tuple[np.ndarray, Any]]:
        images = np.asarray(images)
        prompts = list(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        if len(images) != len(prompts) or len(metadata) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images, {len(prompts)} prompts and "
                             f"{len(metadata)} metadata entries")
        with self._lock:
            self._probe([u for u in self.urls if not self._alive.get(u)])
            live = [u for u in self.urls if self._alive.get(u)]
            if not live:
                raise RewardError(f"{self.name}: all {len(self.urls)} reward endpoints are down: "
                                  f"{self._down()}; {len(prompts)} prompt(s) {_preview(prompts)} not scored")
            n_chunks = min(len(live), max(1, len(prompts)))
            chunks = [c for c in np.array_split(np.arange(len(prompts)), n_chunks) if len(c)]
            results: list[Any] = [None] * len(chunks)
            attempts = [0] * len(chunks)
            todo = list(range(len(chunks)))
            running: dict[Any, tuple[int, str]] = {}
            busy: set[str] = set()
            while todo or running:
                for c in list(todo):  # hand waiting chunks to idle live endpoints (any live one if none idle)
                    live = [u for u in self.urls if self._alive.get(u)]
                    if not live:
                        break
                    idle = [u for u in live if u not in busy]
                    u = idle[0] if idle else live[c % len(live)]
                    rows = chunks[c]
                    fut = self._pool.submit(self._post, u, method, images[rows], [prompts[r] for r in rows],
                                            [metadata[r] for r in rows])
                    running[fut] = (c, u)
                    busy.add(u)
                    todo.remove(c)
                if not running:
                    lost = [prompts[r] for c in todo for r in chunks[c]]
                    raise RewardError(f"{self.name}: all {len(self.urls)} reward endpoints are down: "
                                      f"{self._down()}; {len(lost)} prompt(s) {_preview(lost)} not scored")
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    c, u = running.pop(fut)
                    busy.discard(u)
                    rows = chunks[c]
                    chunk_prompts = [prompts[r] for r in rows]
                    try:
                        results[c] = fut.result()
                    except EndpointDown as e:
                        self._alive[u], self._errors[u] = False, str(e)
                        todo.append(c)  # re-sent to a live endpoint (or the all-down error above)
                    except ScorerFailed as e:
                        attempts[c] += 1
                        if attempts[c] > self.retries:
                            raise RewardError(f"{self.name}: endpoint {u} failed {attempts[c]} time(s) "
                                              f"on {len(rows)} prompt(s) {_preview(chunk_prompts)}: "
                                              f"{e}") from None
                        todo.append(c)
        return list(zip(chunks, results))

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """Rewards float32 (B,) in row order, each row from exactly one endpoint's answer."""
        prompts = list(prompts)
        out = np.empty((len(prompts),), np.float32)
        for rows, r in self._run("score", images, prompts, metadata):
            out[rows] = r
        return out

    @property
    def evaluate(self):
        """The servers' ``evaluate`` (AttributeError where their scorer has none)."""
        if not all(info.get("evaluate") for info in self._info.values()):
            raise AttributeError(f"{self.name}: the served scorer has no evaluate()")
        return self._evaluate

    def _evaluate(self, images, prompts, metadata=None) -> dict:
        parts = self._run("evaluate", images, prompts, metadata)
        out: dict[str, Any] = {}
        for k in parts[0][1] if parts else []:
            vals = [res[k] for _, res in parts]
            out[k] = (np.concatenate(vals) if all(isinstance(v, np.ndarray) for v in vals)
                      else [x for v in vals for x in v])
        return out

    def close(self) -> None:
        """Stop the request threads."""
        self._pool.shutdown(wait=False)
