"""Per-phase wall time of the training loop: rollout, decode, text encode, score, train, eval, checkpoint,
preview (rollout selection's previews: sampling, decoding and scoring them), and idle (the rest: data,
logging, advantages, host work between the phases).

``tl = Timeline()``; ``with tl.phase("rollout"): ...`` adds the block's wall time to the phase;
``tl.lap()`` returns ``{"time/<phase>": s, ..., "time/idle": s, "time/total": s}`` for the wall time since the
previous lap (the trainer logs it with every step, so a step's record also holds the evaluation and
checkpoint that followed the previous step) and adds it to the run's totals; ``tl.summary()`` gives the
totals and each phase's share. Device work is asynchronous: a phase that launches it should end with
``jax.block_until_ready`` on its outputs, or its time shows up in the next phase that waits for them.
"""

from __future__ import annotations

import contextlib
import time

__all__ = ["PHASES", "Timeline", "format_summary"]

PHASES = ("rollout", "decode", "text_encode", "score", "train", "eval", "checkpoint", "preview")


class Timeline:
    """Accumulates wall time per phase, per lap (step) and for the whole run."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._lap = dict.fromkeys(PHASES, 0.0)
        self._total = dict.fromkeys(PHASES + ("idle",), 0.0)
        self._t_lap = clock()
        self._wall = 0.0
        self.laps = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall time of the ``with`` block to phase ``name`` (one of :data:`PHASES`)."""
        if name not in self._lap:
            raise KeyError(f"unknown timeline phase {name!r}: expected one of {PHASES}")
        t = self._clock()
        try:
            yield
        finally:
            self._lap[name] += self._clock() - t

    def lap(self, count: bool = True) -> dict:
        """The per-phase seconds since the previous lap (``time/<phase>``, ``time/idle``, ``time/total``);
        ``count=False`` adds the time to the totals without counting a step (the run's final eval/save)."""
        now = self._clock()
        wall = now - self._t_lap
        self._t_lap = now
        busy = sum(self._lap.values())
        out = {f"time/{k}": v for k, v in self._lap.items()}
        out["time/idle"] = max(0.0, wall - busy)
        out["time/total"] = wall
        for k, v in self._lap.items():
            self._total[k] += v
        self._total["idle"] += out["time/idle"]
        self._wall += wall
        self._lap = dict.fromkeys(PHASES, 0.0)
        self.laps += int(count)
        return out

    def summary(self) -> dict:
        """Run totals: ``{"steps", "wall_s", "phases": {name: {"s", "share"}}}`` over the laps taken."""
        wall = self._wall
        phases = {k: {"s": v, "share": (v / wall if wall > 0 else 0.0)} for k, v in self._total.items()}
        return {"steps": self.laps, "wall_s": wall, "phases": phases}


def format_summary(summary: dict) -> str:
    """One line: ``timeline over N steps (W s): rollout 40% (12.0 s), ...`` (largest first)."""
    parts = sorted(summary["phases"].items(), key=lambda kv: -kv[1]["s"])
    body = ", ".join(f"{k} {100 * v['share']:.0f}% ({v['s']:.1f} s)" for k, v in parts if v["s"] > 0)
    return f"timeline over {summary['steps']} steps ({summary['wall_s']:.1f} s): {body or 'nothing timed'}"
