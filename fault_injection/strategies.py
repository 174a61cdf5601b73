"""Hypothesis strategies for fault schedules (re-exported by ``trainkit_testing.strategies``).

    from hypothesis import given
    from fault_injection.strategies import fault_schedules

    @given(fault_schedules(reports=6, world_size=2, max_faults=2))
    def test_my_loop_survives(schedule):
        plan = FaultPlan(schedule, seed=0)
        ...

A schedule is a list of fault mappings (the ``FaultPlan``/YAML form), each at a distinct
report index, so every fault in it fires (once) in a run that has that many reports.
Shrinking goes towards fewer faults, earlier reports and rank 0. Pure; runs anywhere.
"""

from __future__ import annotations

from typing import Sequence

from hypothesis import strategies as st


def fault_schedules(reports: int = 10, world_size: int = 2, max_faults: int = 2, *,
                    min_faults: int = 0, actions: Sequence[str] = ("kill_worker",),
                    when: Sequence[str] = ("before", "after")) -> st.SearchStrategy:
    """Lists of ``min_faults..max_faults`` worker faults at distinct report indices in ``1..reports``.

    ``actions`` may hold ``kill_worker`` (SIGKILL), ``raise`` and ``hang`` (a short one); the
    rank is any of ``0..world_size-1``; ``when`` picks the side of the report barrier.
    """
    if reports < 1 or world_size < 1 or not 0 <= min_faults <= max_faults:
        raise ValueError("need reports >= 1, world_size >= 1 and 0 <= min_faults <= max_faults")
    max_faults = min(max_faults, reports)
    unknown = set(actions) - {"kill_worker", "raise", "hang"}
    if unknown or not actions:
        raise ValueError(f"actions are among kill_worker, raise, hang (got {sorted(unknown) or 'none'})")

    def fault(index: int):
        return st.builds(
            _fault, st.just(index), st.sampled_from(list(actions)), st.integers(0, world_size - 1),
            st.sampled_from(list(when)))

    indices = st.lists(st.integers(1, reports), min_size=min_faults, max_size=max_faults, unique=True)
    return indices.map(sorted).flatmap(lambda idx: st.tuples(*[fault(i) for i in idx]).map(list))


def _fault(index: int, action: str, rank: int, when: str) -> dict:
    f = {"action": action, "rank": rank, "when": when, "at": {"report": index}}
    if action == "raise":
        f.update(exception="RuntimeError", message=f"injected at report {index}")
    elif action == "hang":
        f["duration_s"] = 0.5
    return f


__all__ = ["fault_schedules"]
