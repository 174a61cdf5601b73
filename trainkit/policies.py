"""Pure decisions: which checkpoints to keep, whether to retry, which group size to run.

No I/O, no Ray, no clocks: each function takes observed state and returns a small
decision value that the ledger or controller acts on. Unit-tested without Ray.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence


# -- retention ----------------------------------------------------------------------------
def _lookup(metrics: Mapping[str, Any], attr: str) -> Any:
    """Find ``attr`` in metrics; ``a/b`` looks into nested dicts as Ray's flattening does."""
    if attr in metrics:
        return metrics[attr]
    cur: Any = metrics
    for part in attr.split("/"):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def score_of(metrics: Mapping[str, Any], attr: str, order: str) -> float:
    """Higher is better. Missing, non-numeric or NaN scores rank worst (-inf) in both orders."""
    v = _lookup(metrics or {}, attr)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return -math.inf
    return float(v) if order == "max" else -float(v)


@dataclass(frozen=True)
class CheckpointEntry:
    index: int  # report index that committed it (commit order)
    dir: str
    metrics: Mapping[str, Any]


def rank_checkpoints(entries: Sequence[CheckpointEntry], score_attribute: Optional[str],
                     order: str) -> list[CheckpointEntry]:
    """Worst first, best last. Without a score attribute: oldest first (commit order)."""
    if score_attribute is None:
        return list(entries)
    keyed = [(score_of(e.metrics, score_attribute, order), pos, e) for pos, e in enumerate(entries)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [e for _, _, e in keyed]


@dataclass(frozen=True)
class Retention:
    keep: tuple  # CheckpointEntry in commit order
    delete: tuple  # CheckpointEntry to remove from storage
    best: tuple  # Result.best_checkpoints order: worst -> best


def decide_retention(entries: Sequence[CheckpointEntry], num_to_keep: Optional[int],
                     score_attribute: Optional[str], order: str) -> Retention:
    """Keep the top ``num_to_keep`` by score plus the latest checkpoint (Ray Train's rule)."""
    ranked = rank_checkpoints(entries, score_attribute, order)
    best = ranked if num_to_keep is None else ranked[-num_to_keep:] if num_to_keep else []
    if not entries:
        return Retention((), (), ())
    latest = entries[-1]
    keep_ids = {id(e) for e in best} | {id(latest)}
    keep = tuple(e for e in entries if id(e) in keep_ids)
    delete = tuple(e for e in entries if id(e) not in keep_ids and e.dir not in {k.dir for k in keep})
    return Retention(keep, delete, tuple(best))


# -- failures -------------------------------------------------------------------------------
class FailureDecision(enum.Enum):
    RETRY = "retry"
    RAISE = "raise"


def decide_failure(failures_so_far: int, max_failures: int, *, preemption: bool = False,
                   preemptions_so_far: int = 0, max_preemptions: int = -1,
                   retryable: bool = True) -> FailureDecision:
    """The n-th failure of a kind is retried iff n <= its limit (-1: unlimited).

    ``failures_so_far`` / ``preemptions_so_far`` include the failure being decided.
    """
    if not retryable:
        return FailureDecision.RAISE
    if preemption:
        limit, n = max_preemptions, preemptions_so_far
    else:
        limit, n = max_failures, failures_so_far
    if limit == -1 or n <= limit:
        return FailureDecision.RETRY
    return FailureDecision.RAISE


# -- scaling ---------------------------------------------------------------------------------
def count_fitting_workers(free_by_node: Mapping[str, Mapping[str, float]],
                          per_worker: Mapping[str, float]) -> int:
    """How many worker bundles fit into the free resources, node by node."""
    total = 0
    for free in free_by_node.values():
        fits = math.inf
        for res, need in per_worker.items():
            if need <= 0:
                continue
            fits = min(fits, math.floor(free.get(res, 0.0) / need + 1e-9))
        total += 0 if fits is math.inf else int(fits)
    return total


@dataclass(frozen=True)
class SizeDecision:
    world_size: int  # 0: wait, not enough resources for min_workers
    reason: str


def decide_group_size(fitting: int, min_workers: int, max_workers: int) -> SizeDecision:
    """Largest size that fits, capped at max; 0 (wait) below min."""
    n = min(fitting, max_workers)
    if n < min_workers:
        return SizeDecision(0, f"only {fitting} worker(s) fit, fewer than min_workers={min_workers}")
    return SizeDecision(n, f"{fitting} worker(s) fit; running {n} (min {min_workers}, max {max_workers})")


def decide_resize(current: int, fitting_extra: int, min_workers: int, max_workers: int) -> int:
    """At a report boundary: the size to grow to (0: keep the current size).

    ``fitting_extra`` is how many more workers the free resources hold now.
    """
    target = min(max_workers, current + fitting_extra)
    return target if target > current and target >= min_workers else 0
