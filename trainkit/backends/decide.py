"""The attempt loop's decisions: pure functions of what was observed, returning what to do.

``decide(outcome, budget, failure_config)`` is called once an attempt has ended: every rank
finished, or some failed, were preempted, hung, disagreed about ``report()``, or the run was
aborted or resized. It returns the action the executor performs (``Finish``, ``Abort``,
``Resize``, ``Restart`` or ``Fail``) and the new failure budget. ``decide_at_commit`` is
called at each committed report: stop the attempt after it for a preemption notice, or to
grow an elastic group, or look for capacity.

One set of rules for every mode: the Ray controller (``trainkit.backends.ray.controller``)
and the in-process loop (``trainkit.backends.api.run_attempts``: local mode and the
conformance suite's backends) execute the same decisions. No I/O, no Ray, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from trainkit.backends.barrier import describe_ranks
from trainkit.errors import (ControllerError, HangDetectedError, PreemptionError, StorageFailedError, TrainingFailedError, WorkerFailure,
                             WorkerGroupError)
from trainkit.policies import FailureDecision, decide_failure, decide_resize

# a peer's broken collective, or torchrun stopping the survivors: the effect of a failure, not its cause
COLLATERAL = ("Connection closed by peer", "Connection reset", "torchrun stopped this rank (SIGTERM)")


# what a torch.distributed collective raises when a peer is gone or slow (gloo, NCCL, the c10d store)
_COLLECTIVE = re.compile(r"Connection closed by peer|Connection reset by peer|gloo|NCCL|ProcessGroup|"
                         r"c10d|Timed out waiting|Socket Timeout|Broken pipe", re.IGNORECASE)
_PEER = re.compile(r"\b(?:peer |remote )?rank[ :=]+(\d+)", re.IGNORECASE)


def is_collective_error(message: str) -> bool:
    """Whether an exception's message is a torch.distributed collective's error (a peer gone, a timeout)."""
    return bool(_COLLECTIVE.search(message or ""))


def peer_rank(message: str) -> Optional[int]:
    """The peer rank a collective's error message names (NCCL's ``rank 1``), if it names one."""
    m = _PEER.search(message or "")
    return int(m.group(1)) if m else None


def root_cause_first(failures) -> list[WorkerFailure]:
    """User exceptions and deaths before the collateral damage (peers' broken collectives); otherwise in
    the order they happened."""
    return sorted(failures, key=lambda f: 1 if f.kind == "collective" or any(c in f.message for c in COLLATERAL)
                  else 0)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended (the observation). No failures: every rank finished."""

    failures: tuple = ()  # WorkerFailure, root cause first
    value: Any = None  # rank 0's return value, when every rank finished
    aborted: bool = False  # Ctrl-C or a dead driver
    hang_error: Optional[HangDetectedError] = None  # HangConfig(action="fail") ended it
    returned: frozenset = frozenset()  # world ranks whose process returned (reusable)
    preempted: frozenset = frozenset()  # world ranks with a preemption notice
    elastic: bool = False
    min_workers: int = 1  # an elastic group's floor


@dataclass(frozen=True)
class Budget:
    """Failures and preemptions counted so far in the run (across fits of it)."""

    failures: int = 0
    preemptions: int = 0


@dataclass(frozen=True)
class Finish:
    value: Any = None


@dataclass(frozen=True)
class Abort:
    error: WorkerGroupError


@dataclass(frozen=True)
class Resize:
    """The attempt ended at a committed report to change the group's size: start again, uncounted."""


@dataclass(frozen=True)
class Restart:
    """Record the failure and run the next attempt from the latest committed checkpoint."""

    kind: str  # "failure" | "preemption" | "hang": how the failure is recorded
    keep: frozenset = field(default_factory=frozenset)  # world ranks whose processes the next group reuses
    wait_for_preempted: bool = False  # let noticed nodes leave before placing the next group
    # an elastic group re-forms at once without its noticed ranks; their slots start new workers in the
    # background once the noticed nodes have left (the group grows back with them)
    regrow_after_preempted: bool = False


@dataclass(frozen=True)
class Fail:
    kind: str
    error: TrainingFailedError


Action = Union[Finish, Abort, Resize, Restart, Fail]


def decide(outcome: Outcome, budget: Budget, failure_config) -> tuple[Action, Budget]:
    """What to do once an attempt ended, and the failure budget afterwards."""
    failures = list(outcome.failures)
    if not failures:
        return Finish(outcome.value), budget
    if outcome.aborted:
        return Abort(WorkerGroupError("the run was aborted (Ctrl-C or a dead driver)", failures)), budget
    if failures[0].kind == "resize":
        return Resize(), budget
    callback = next((f for f in failures if f.kind == "callback"), None)
    if callback is not None:  # a UserCallback raised: a controller failure, never retried (as in Ray Train)
        rest = [f for f in failures if f.kind != "callback"]  # the ranks whose report() raised it are copies
        return Fail("failure", ControllerError(f"a UserCallback raised; root cause: {callback.message}",
                                               [callback] + rest)), Budget(budget.failures + 1, budget.preemptions)
    preemption = any(f.kind == "preempted" for f in failures)
    if preemption:
        budget = Budget(budget.failures, budget.preemptions + 1)
    else:
        budget = Budget(budget.failures + 1, budget.preemptions)
    hang = failures[0].kind == "hang"
    kind = "preemption" if preemption else "hang" if hang else "failure"
    mismatch = any(f.kind == "mismatch" for f in failures)
    storage = next((f for f in failures if f.kind == "storage"), None)  # full, read-only, forbidden storage
    retryable = not mismatch and storage is None and outcome.hang_error is None
    verdict = decide_failure(budget.failures, failure_config.max_failures, retryable=retryable,
                             preemption=preemption, preemptions_so_far=budget.preemptions,
                             max_preemptions=failure_config.max_preemptions)
    if verdict is FailureDecision.RAISE:
        why = ("ranks disagree about report()/collective calls" if mismatch else
               f"{budget.failures} failure(s), max_failures={failure_config.max_failures}")
        if preemption and not mismatch:
            why = f"{budget.preemptions} preemption(s), max_preemptions={failure_config.max_preemptions}"
        if storage is not None:
            failures = [storage] + [f for f in failures if f is not storage]
            return Fail(kind, StorageFailedError(f"the storage cannot take the run any more (no retry can help); "
                                                 f"root cause: {storage.headline()}", failures)), budget
        error_cls = HangDetectedError if hang else (PreemptionError if preemption and not mismatch
                                                    else WorkerGroupError)
        error = outcome.hang_error or error_cls(f"{why}; root cause: {failures[0].headline()}", failures)
        return Fail(kind, error), budget
    keep = frozenset()
    if not preemption or outcome.elastic:
        # a noticed rank is going away (its node with it): a fixed-size group is placed anew; an
        # elastic one re-forms without it, keeping the others
        keep = frozenset(r for r in outcome.returned if r not in outcome.preempted)
    if preemption and outcome.elastic and len(keep) >= outcome.min_workers:
        return Restart(kind, keep=keep, regrow_after_preempted=True), budget
    return Restart(kind, keep=keep, wait_for_preempted=preemption), budget


@dataclass(frozen=True)
class RepairPlan:
    """How the ranks a failure took are replaced: ``spares`` by ready hot spares, ``start`` by fresh
    workers started now (the next attempt waits for them), ``regrow`` left out of the next attempt
    (an elastic group re-forms smaller; their workers start in the background and the group grows
    back at a checkpointed report once they are ready)."""

    spares: int = 0
    start: int = 0
    regrow: int = 0


def plan_repair(*, kept: int, lost: int, spares_ready: int, elastic: bool, min_workers: int) -> RepairPlan:
    """``kept`` ranks keep their processes, ``lost`` must be replaced, ``spares_ready`` spares are ready.

    >>> plan_repair(kept=2, lost=1, spares_ready=0, elastic=True, min_workers=1)
    RepairPlan(spares=0, start=0, regrow=1)
    """
    spares = min(lost, spares_ready)
    rest = lost - spares
    if not elastic:
        return RepairPlan(spares=spares, start=rest)
    start = min(rest, max(0, min_workers - kept - spares))  # an elastic group never re-forms below min_workers
    return RepairPlan(spares=spares, start=start, regrow=rest - start)


@dataclass(frozen=True)
class StopAfterCommit:
    """End the attempt once this report is committed on every rank."""

    failure: WorkerFailure  # kind "preempted" or "resize": how the attempt's end is recorded


@dataclass(frozen=True)
class Probe:
    """Look for capacity to grow (in the background)."""


def decide_at_commit(*, index: int, checkpointed: bool, world_size: int, preempted: dict, grow_ready: int,
                     elastic: bool, min_workers: int, max_workers: int) -> Union[StopAfterCommit, Probe, None]:
    """At a committed report: stop for a preemption notice (``preempted``: world rank -> node id),
    grow an elastic group where capacity was found and no progress is lost (a checkpointed
    report), or probe for capacity."""
    if preempted:
        ranks = sorted(preempted)
        who = describe_ranks(ranks)
        return StopAfterCommit(WorkerFailure(world_rank=ranks[0], node_id=preempted[ranks[0]], kind="preempted",
                                             exc_type="Preempted", message=f"{who} preempted; stopped after "
                                                                           f"report {index}"))
    if not elastic or world_size >= max_workers:
        return None
    if grow_ready:
        if not checkpointed:
            return None
        target = decide_resize(world_size, grow_ready, min_workers, max_workers)
        if target:
            return StopAfterCommit(WorkerFailure(world_rank=-1, kind="resize", message=(
                f"capacity for {target} workers: growing from {world_size} after report {index}")))
        return None
    return Probe()
