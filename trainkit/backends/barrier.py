"""Rounds: the barrier every rank passes at ``report()`` and at trainkit collectives.

A round is keyed by ``(operation, sequence)``: ``("report", index)``, ``("barrier", 2)``,
``("broadcast", 1)``. Every rank of the group arrives with the same key; the last arrival
completes the round and all are released together. Any disagreement is a mismatch, named
here in one wording for every mode:

* ``different_operations``: ranks arrived at different keys;
* ``returned_while_waiting``: a rank's training function returned while others wait;
* ``arrived_after_return``: a rank arrives where another has already returned;
* ``gathered_mismatch``: the torchrun coordinator's check of every rank's key at once.

Pure: no Ray, no I/O (the futures are asyncio's). The Ray controller keeps one ``Barrier``
per attempt; the torchrun coordinator (``trainkit.backends.local``) gathers keys over gloo
and uses the same checks and ``report_payload``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from trainkit.errors import CheckpointError, ReportError


def describe_ranks(ranks) -> str:
    """``rank 1`` or ``ranks [0, 2]``."""
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def describe_key(key: tuple) -> str:
    """``report 3`` or ``barrier #2``."""
    op, seq = key
    return f"report {seq}" if op == "report" else f"{op} #{seq}"


def different_operations(waiting: Sequence[int], open_key: tuple, rank: int, key: tuple) -> ReportError:
    return ReportError(f"ranks called different operations: {describe_ranks(waiting)} in {open_key[0]} "
                       f"{open_key[1]}, rank {rank} in {key[0]} {key[1]}; every rank must call report() and "
                       "collectives in the same order")


def returned_while_waiting(rank: int, reports: int, waiting: Sequence[int], key: tuple) -> ReportError:
    return ReportError(f"rank {rank} returned from the training function after {reports} report(s) while "
                       f"{describe_ranks(waiting)} wait in {describe_key(key)}: every rank must call report() "
                       "(and collectives) the same number of times")


def arrived_after_return(rank: int, key: tuple, returned: Mapping[int, int]) -> ReportError:
    """``returned`` maps the ranks that already returned to their report counts."""
    done = sorted(returned)
    return ReportError(f"rank {rank} called {key[0]} ({key[0]} {key[1]}) but {describe_ranks(done)} already "
                       f"returned from the training function after {returned[done[0]]} report(s): every rank "
                       "must call report() the same number of times")


def gathered_mismatch(keys: Sequence[tuple], reports: Sequence[Optional[int]]) -> Optional[ReportError]:
    """Every rank's key of one torchrun round (``("finish", 1)`` for a rank that returned, with its
    report count in ``reports``); None when they agree."""
    ops = set(keys)
    if len(ops) <= 1:
        return None
    if any(k[0] == "finish" for k in keys):
        def state(k, n):
            if k[0] == "finish":
                return f"returned after {n} report(s)"
            return f"is waiting at {describe_key(k)}"

        ranks = ", ".join(f"rank {r} {state(k, n)}" for r, (k, n) in enumerate(zip(keys, reports)))
        return ReportError(f"report() mismatch: {ranks}; every rank must call report() (and barrier(), "
                           "broadcast_from_rank_zero()) the same number of times")
    desc = ", ".join(f"rank {r}: {k[0]} #{k[1]}" for r, k in enumerate(keys))
    (a_op, a_seq), (b_op, b_seq) = sorted(ops)[:2]
    return ReportError(f"ranks called different collectives: {a_op} #{a_seq} vs {b_op} #{b_seq} ({desc}); "
                       "every rank must call report()/barrier()/broadcast_from_rank_zero() in the same order")


def report_payload(index: int, arrivals: Mapping[int, tuple]) -> tuple[dict, Optional[str], dict]:
    """``(metrics, checkpoint_dir, files by rank)`` of a complete report round, whose arrivals map
    world rank -> ``(metrics, checkpoint_dir, files)`` (rank 0's metrics are the report's)."""
    dirs = {p[1] for p in arrivals.values() if p[1] is not None}
    if len(dirs) > 1:
        raise CheckpointError(f"report {index}: ranks used different checkpoint_dir_name values {sorted(dirs)}")
    d = dirs.pop() if dirs else None
    files = {r: p[2] for r, p in arrivals.items() if p[1] is not None}
    return arrivals[0][0] or {}, d, files


@dataclass
class Round:
    key: tuple  # ("report", index) or (op, seq)
    started: float  # first arrival (monotonic)
    arrivals: dict = field(default_factory=dict)  # world rank -> payload
    arrived_at: dict = field(default_factory=dict)  # world rank -> when it arrived (monotonic)
    fut: Optional[asyncio.Future] = None  # the reply every rank of the round awaits


class Barrier:
    """The open round of one attempt (at most one: every rank is in the same round or in none).

    ``changed`` is set whenever a round opens or closes, so that a watcher (the hang monitor)
    sleeps until something happens or its own deadline, instead of polling.
    """

    def __init__(self, world_size: int, now: float = 0.0):
        self.world_size = world_size
        self.round: Optional[Round] = None
        self.released_at = now  # when the last round released its ranks (at first: the attempt's start)
        self.rounds = 0  # rounds closed so far (completed or ended): progress, for a watcher
        self.changed = asyncio.Event()

    def arrive(self, rank: int, key: tuple, payload: Any, now: float) -> tuple[Round, bool]:
        """Record ``rank``'s arrival; returns the round and whether this arrival completed it
        (then the round is closed and the caller replies on ``round.fut``). Raises the mismatch
        ``ReportError`` when ``key`` is not the open round's."""
        rnd = self.round
        if rnd is None:
            rnd = self.round = Round(key, now, fut=asyncio.get_running_loop().create_future())
            self.changed.set()
        elif rnd.key != key:
            raise different_operations(list(rnd.arrivals), rnd.key, rank, key)
        rnd.arrivals[rank] = payload
        rnd.arrived_at[rank] = now
        if len(rnd.arrivals) < self.world_size:
            return rnd, False
        self.round = None
        self.rounds += 1
        self.changed.set()
        return rnd, True

    def close(self, reply: tuple) -> Optional[Round]:
        """End the open round: every rank waiting in it gets ``reply`` (``("stop", why)`` or
        ``("error", exc)``). Returns the closed round, if one was open."""
        rnd, self.round = self.round, None
        if rnd is not None:
            self.rounds += 1
            self.changed.set()
            if rnd.fut is not None and not rnd.fut.done():
                rnd.fut.set_result(reply)
        return rnd
