"""Positions and plans (pure): which rows a rank reads in an epoch, and what is left after a restore.

A row's *position* is its place in its source's fixed order; a *plan* is a list of position
ranges. Runs anywhere; numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

from trainkit.errors import ConfigError

STATE_VERSION = 1  # the format of state_dict()


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s block of ``n`` rows; sizes differ by at most one.

    >>> [shard_bounds(10, 3, r) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def to_ranges(positions: np.ndarray) -> list[list[int]]:
    """Sorted unique positions -> ``[[start, stop), ...]`` runs."""
    p = np.asarray(positions, dtype=np.int64)
    if p.size == 0:
        return []
    breaks = np.nonzero(np.diff(p) != 1)[0]
    starts = np.concatenate(([p[0]], p[breaks + 1]))
    stops = np.concatenate((p[breaks] + 1, [p[-1] + 1]))
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def from_ranges(ranges: Sequence[Sequence[int]]) -> np.ndarray:
    if not ranges:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def ranges_len(ranges: Sequence[Sequence[int]]) -> int:
    return int(sum(b - a for a, b in ranges))


def iteration_order(plan: Sequence[Sequence[int]], shuffle: Optional[dict], epoch: int) -> np.ndarray:
    """Positions of ``plan`` in the order a pass hands them out.

    Without shuffle: plan order. With ``{"buffer_size": s, "seed": k}``: the plan is cut
    into windows of ``s`` rows and each window is permuted by a generator seeded with
    ``(k, epoch)``; a pure function of its arguments, so a restore can recompute it.
    """
    pos = from_ranges(plan)
    if shuffle and pos.size:
        s = max(1, int(shuffle["buffer_size"]))
        rng = np.random.default_rng([int(shuffle["seed"]), int(epoch)])
        for i in range(0, pos.size, s):
            pos[i:i + s] = rng.permutation(pos[i:i + s])
    return pos


def remaining_positions(state: dict) -> np.ndarray:
    """Sorted positions of ``state``'s plan that were not handed out yet."""
    order = iteration_order(state["plan"], state.get("shuffle"), state["epoch"])
    return np.sort(order[int(state["consumed"]):])


def _bad_state(what: str, value: Any, hint: str = "") -> ConfigError:
    return ConfigError("get_dataset_shard(state_dict)", value, what, hint=hint)


def _check_state(s: Any, num_rows: int, name: str) -> dict:
    if not isinstance(s, Mapping) or s.get("version") != STATE_VERSION or "plan" not in s:
        raise _bad_state("a dict from shard.state_dict() or iterator.state_dict() (or a list of them)",
                         type(s).__name__ if not isinstance(s, Mapping) else {k: s[k] for k in list(s)[:4]})
    if int(s["num_rows"]) != num_rows:
        raise _bad_state(f"a state of a dataset with {num_rows} rows", f"a state saved with {s['num_rows']} rows",
                         hint=f"the dataset {name!r} changed between save and restore; resume needs the same rows")
    return dict(s)


def plan_after_restore(states: Any, num_rows: int, world_size: int, world_rank: int,
                       name: str = "") -> tuple[int, Optional[list[list[int]]]]:
    """The (epoch, plan) of this rank's first pass after restoring from ``states``.

    ``plan`` is None when the saved epoch was fully consumed: the next pass is a fresh
    epoch. Pure: every rank computes its own part of the same split.
    """
    if isinstance(states, Mapping):
        s = _check_state(states, num_rows, name)
        if int(s["world_size"]) != world_size or int(s["world_rank"]) != world_rank:
            raise _bad_state(
                f"this rank's own state (world_rank={world_rank}, world_size={world_size})",
                f"the state of world_rank={s['world_rank']} of world_size={s['world_size']}",
                hint="save every rank's state (trainkit.data.save_shard_state in each rank's checkpoint folder) "
                     "and pass the list of all of them (trainkit.data.load_shard_states) to resume after a "
                     "world-size change")
        states = [s]
        all_ranks = False
    else:
        if not isinstance(states, (list, tuple)) or not states:
            raise _bad_state("a state dict or a non-empty list of every rank's state dicts", states)
        states = [_check_state(s, num_rows, name) for s in states]
        all_ranks = True
    if all_ranks:
        sizes = {int(s["world_size"]) for s in states}
        ranks = sorted(int(s["world_rank"]) for s in states)
        if len(sizes) != 1 or ranks != list(range(sizes.pop())):
            raise _bad_state("one state per rank of the saved group (ranks 0..W-1, same world_size)",
                             [(s["world_rank"], s["world_size"]) for s in states],
                             hint="load every rank's file (trainkit.data.load_shard_states) of one checkpoint")
    # A rank that finished its plan of epoch E-1 and has not started epoch E yet holds its
    # fresh block of epoch E: nothing of it was consumed.
    epoch = max(int(s["epoch"]) for s in states)
    norm = []
    for s in states:
        if int(s["epoch"]) == epoch - 1 and int(s["consumed"]) >= ranges_len(s["plan"]):
            a, b = shard_bounds(num_rows, int(s["world_size"]), int(s["world_rank"]))
            s = dict(s, epoch=epoch, plan=[[a, b]] if b > a else [], consumed=0, shuffle=None)
        elif int(s["epoch"]) != epoch:
            raise _bad_state("states of one epoch", sorted({int(x["epoch"]) for x in states}),
                             hint="ranks were more than one epoch apart; save the states at the same report")
        norm.append(s)
    left = np.concatenate([remaining_positions(s) for s in norm]) if norm else np.empty(0, np.int64)
    left.sort()
    if left.size > 1 and np.any(np.diff(left) == 0):
        raise _bad_state("states whose plans do not overlap", "overlapping plans",
                         hint="pass the states of one checkpoint only")
    if left.size == 0:  # the epoch is done: the next pass is a fresh epoch
        return epoch + 1, None
    if not all_ranks:
        return epoch, to_ranges(left)
    a, b = shard_bounds(int(left.size), world_size, world_rank)
    return epoch, to_ranges(left[a:b])
