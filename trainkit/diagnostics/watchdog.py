"""The hang watchdog's decisions: pure functions of observed state and a clock, no I/O.

Two kinds of hang, both against ``HangConfig.timeout_s``:

* **barrier**: a report (or trainkit collective) round is open and its first rank has
  waited longer than the timeout; the missing ranks are the ones that have not arrived.
* **group**: no round is open and nothing was committed for longer than the timeout
  since the attempt started or the last round completed: every rank is missing (all
  stuck in a torch.distributed collective, or all busy).

A hang is reported once at ``timeout_s``; with ``action="warn"`` the same hang is
reported again at 2x, 4x, 8x ... the timeout (capped), so a long stall is visible
without flooding the log. Any progress resets it. The controller's executor
(``trainkit.diagnostics.hang``) feeds observations in and acts on the ``Hang`` values.
Runs in the controller actor (and in unit tests with a fake clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MAX_REPEAT_INTERVAL_S = 600.0


@dataclass(frozen=True)
class Hang:
    """One detection: what is stuck, since when, and which repetition this is (0: first)."""

    kind: str  # "barrier" | "group"
    index: int  # the report index the group is stuck at (for a group hang: last committed + 1)
    at: str  # "report 3", "barrier #2", or "after report 2"
    missing_ranks: tuple
    waiting_ranks: tuple
    waited_s: float
    repeat: int = 0


@dataclass(frozen=True)
class Observation:
    """What the controller sees at one tick."""

    now: float
    world_size: int
    committed_index: int  # last report index committed (or resumed from) in this attempt
    last_progress: float  # when the attempt started or a round last completed
    round_key: Optional[tuple] = None  # ("report", index) or (op, seq) of the open round
    round_started: float = 0.0  # first arrival
    arrived: frozenset = frozenset()


class Watchdog:
    """Decides, tick by tick, whether the group hangs.

    >>> w = Watchdog(timeout_s=2.0)
    >>> obs = Observation(now=10.0, world_size=2, committed_index=2, last_progress=9.0,
    ...                   round_key=("report", 3), round_started=7.5, arrived=frozenset({0}))
    >>> w.check(obs).missing_ranks
    (1,)
    >>> w.check(obs) is None  # reported once; the next reminder comes at 2 x timeout
    True
    """

    def __init__(self, timeout_s: float, *, backoff: float = 2.0, repeat: bool = True):
        if not timeout_s or timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s = float(timeout_s)
        self.backoff = backoff
        self.repeat = repeat
        self._key: Optional[tuple] = None
        self._count = 0
        self._next_at = 0.0

    def next_deadline(self) -> Optional[float]:
        """When the current stall would be reported next (None before the first check)."""
        return self._next_at if self._key is not None else None

    def check(self, obs: Observation) -> Optional[Hang]:
        if obs.round_key is not None and obs.arrived:
            key = ("barrier", obs.round_key, obs.round_started)
            since = obs.round_started
        else:
            key = ("group", obs.committed_index, obs.last_progress)
            since = obs.last_progress
        if key != self._key:
            self._key, self._count = key, 0
            self._next_at = since + self.timeout_s
        if obs.now < self._next_at:
            return None
        if self._count > 0 and not self.repeat:
            return None
        hang = self._describe(obs, key[0], since)
        self._count += 1
        interval = min(self.timeout_s * self.backoff ** self._count, MAX_REPEAT_INTERVAL_S)
        self._next_at = max(since + interval, obs.now + min(self.timeout_s, interval))
        return hang

    def _describe(self, obs: Observation, kind: str, since: float) -> Hang:
        ranks = tuple(range(obs.world_size))
        waited = round(obs.now - since, 3)
        if kind == "barrier":
            op, n = obs.round_key
            missing = tuple(r for r in ranks if r not in obs.arrived)
            waiting = tuple(sorted(obs.arrived))
            index = n if op == "report" else obs.committed_index + 1
            at = f"report {n}" if op == "report" else f"{op} #{n}"
            return Hang("barrier", index, at, missing, waiting, waited, self._count)
        return Hang("group", obs.committed_index + 1, f"after report {obs.committed_index}", ranks, (), waited,
                    self._count)


def describe_ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def summary_line(hang: Hang, rows: dict) -> str:
    """The one-line summary, e.g. ``hang at report 3: rank 1 has not arrived after 5.0 s; it is in
    stuck (train.py:12), in user code``. ``rows`` maps world rank -> classification dict
    (``classification``, ``description``, ``user_frame``) for the missing ranks."""
    missing = list(hang.missing_ranks)
    if hang.kind == "barrier":
        verb = "has" if len(missing) == 1 else "have"
        head = f"hang at {hang.at}: {describe_ranks(missing)} {verb} not arrived after {hang.waited_s:.1f} s"
        if hang.waiting_ranks:
            head += f" ({describe_ranks(hang.waiting_ranks)} waiting)"
    else:
        head = (f"hang {hang.at}: no report or collective for {hang.waited_s:.1f} s; all {len(missing)} ranks "
                "are stuck")

    def where(row: dict) -> str:
        frame = row.get("user_frame")
        desc = row.get("description") or row.get("classification") or "somewhere unknown"
        if row.get("classification") == "dead":
            return desc
        return f"in {frame}, {desc}" if frame else desc

    groups: dict[str, list] = {}
    for r in missing:
        groups.setdefault(where(rows.get(r) or {}), []).append(r)
    if len(groups) == 1:
        (w, rs), = groups.items()
        subject = "it is" if len(missing) == 1 else "they are"
        return f"{head}; {subject} {w}"
    parts = [f"{describe_ranks(rs)} {'is' if len(rs) == 1 else 'are'} {w}" for w, rs in groups.items()]
    return f"{head}; " + "; ".join(parts)
