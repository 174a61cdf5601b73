"""Stragglers: a rank whose steps stay much slower than the others'. Pure, no I/O.

The report barrier already shows every rank's arrival, so the controller keeps, per
report, each rank's *step time*: from the release of the previous round (or the attempt's
start) to its arrival at this report. No extra round trips. ``StragglerWatch`` sees
those, report after report: a rank is slow at a report when its step time is more than
``factor`` times the median of the other ranks' and at least ``min_slower_s`` longer. A
rank slow at ``reports`` consecutive reports is a straggler, named once per attempt (and
again only after it caught up and fell behind anew).

``sample_kind(frames)`` classifies one stack sample of a straggler: data loading, compute
(inside torch), collective, checkpoint I/O (torch.save, fsspec, trainkit's upload) or user
code with its frame; ``summarize_samples`` counts every frame and kind over a ~1 s sample.

Runs in the controller actor (and in unit tests with made-up step times).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from trainkit.diagnostics.classify import Frame, classify_thread, is_user_frame, parse_dump, training_thread

KINDS = ("data_loading", "compute", "collective", "checkpoint_io", "user_code", "unknown")
DESCRIPTIONS = {"data_loading": "waiting for data", "compute": "computing in torch",
                "collective": "in a torch.distributed collective", "checkpoint_io": "writing a checkpoint",
                "user_code": "in user code", "unknown": "stack unavailable"}


@dataclass(frozen=True)
class Straggler:
    world_rank: int
    index: int  # the report at which it was named
    median_step_s: float  # its step time over the reports that named it (median)
    others_median_step_s: float  # the other ranks' step time over the same reports (median)


@dataclass
class StragglerWatch:
    """Feeds on each report's step times; returns the ranks that just became stragglers.

    >>> w = StragglerWatch(reports=2)
    >>> w.observe(1, {0: 0.02, 1: 0.6}), [s.world_rank for s in w.observe(2, {0: 0.02, 1: 0.6})]
    ([], [1])
    """

    factor: float = 2.0
    min_slower_s: float = 0.2
    reports: int = 3
    _slow: dict = field(default_factory=dict)  # world rank -> [(own step, others' median), ...] consecutive
    _named: set = field(default_factory=set)

    def observe(self, index: int, step_s: Mapping[int, float]) -> list[Straggler]:
        if len(step_s) < 2:
            return []
        out = []
        for rank, own in step_s.items():
            others = statistics.median(v for r, v in step_s.items() if r != rank)
            if own > self.factor * others and own - others >= self.min_slower_s:
                run = self._slow.setdefault(rank, [])
                run.append((own, others))
                if len(run) >= self.reports and rank not in self._named:
                    self._named.add(rank)
                    window = run[-self.reports:]
                    out.append(Straggler(rank, index, round(statistics.median(o for o, _ in window), 4),
                                         round(statistics.median(m for _, m in window), 4)))
            else:
                self._slow.pop(rank, None)
                self._named.discard(rank)
        return out


def step_times(arrived_at: Mapping[int, float], released_at: float) -> dict[int, float]:
    """Each rank's step time at one report: its arrival minus the previous release."""
    return {r: round(max(0.0, t - released_at), 4) for r, t in arrived_at.items()}


_IO_MARKERS = ("/torch/serialization.py", "/fsspec/", "/s3fs/", "/trainkit/storage.py", "/trainkit/checkpoint.py")


def sample_kind(frames: Sequence[Frame]) -> tuple[str, Optional[Frame]]:
    """``(kind, innermost user frame)`` of one sample of a rank's training thread (innermost first)."""
    for f in frames:
        p = "/" + f.file.replace("\\", "/")
        if any(m in p for m in _IO_MARKERS):
            return "checkpoint_io", next((u for u in frames if is_user_frame(u)), None)
    kind, user = classify_thread(list(frames))
    if kind in ("data_loading", "collective"):
        return kind, user
    if kind == "report":  # already at the barrier in this sample: not what makes it slow
        return "unknown", user
    inner = frames[0] if frames else None
    if inner is not None and "/torch/" in "/" + inner.file.replace("\\", "/"):
        return "compute", user
    return ("user_code", user) if user is not None else ("unknown", None)


def summarize_samples(texts: Sequence[str]) -> dict:
    """Count every frame and kind over the dumps of one rank: ``{"samples", "kind", "user_frame",
    "kinds": {kind: n}, "frames": {"function (file:line)": n}}`` (the most common kind wins)."""
    kinds: dict[str, int] = {}
    frames: dict[str, int] = {}
    users: dict[str, int] = {}
    n = 0
    for text in texts:
        procs = parse_dump(text)
        t = training_thread(procs[0]) if procs else None
        if t is None:
            continue
        n += 1
        kind, user = sample_kind(t.frames)
        kinds[kind] = kinds.get(kind, 0) + 1
        if user is not None:
            users[user.short()] = users.get(user.short(), 0) + 1
        for f in t.frames:
            frames[f.short()] = frames.get(f.short(), 0) + 1
    if not n:
        return {"samples": 0, "kind": "unknown", "user_frame": None, "kinds": {}, "frames": {}}
    top = max(kinds, key=lambda k: (kinds[k], k != "unknown"))
    return {"samples": n, "kind": top, "user_frame": max(users, key=users.get) if users else None,
            "kinds": kinds, "frames": dict(sorted(frames.items(), key=lambda kv: -kv[1]))}
