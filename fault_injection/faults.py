"""Faults as data: an action (what breaks), a target (which rank or node) and a trigger (when).

A fault is a pydantic model, written in YAML or Python as a mapping whose kind is the key
``action:``. The same mapping validates in a scenario file and in ``FaultPlan(faults=[...])``:

    {"action": "kill_worker", "rank": 1, "at": {"report": 3}}
    {"action": "preempt", "node": 2, "grace_s": 5, "at": {"report": 4}}
    {"action": "raise", "rank": "random", "exception": "ValueError", "message": "bad batch",
     "at": {"attempt": 1, "report": 2}}

Triggers are checked inside the rank at each ``report()`` (``when: before`` the barrier,
the default, or ``after`` it), so a scenario replays identically. ``firing_key`` says
which firings count as "the same": a fault fires once per key per run (the runtime's
ledger refuses a second ``fault_injected`` event with the same key), so a rank that
resumes from a checkpoint before the fault's report does not fire it again.

Pure data and pure functions; imported in the driver, the controller and every rank.
"""

from __future__ import annotations

import random
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ACTIONS = ("kill_worker", "kill_node", "preempt", "hang", "raise", "slow", "storage_error", "add_node")
NODE_ACTIONS = ("kill_node", "add_node")  # done by the driver-side broker, never inside a rank

_SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGSEGV", "SIGABRT", "SIGQUIT", "SIGUSR1")

# Bounds on numbers: a scenario runs for seconds to minutes on a laptop, so anything beyond these is a
# typo (1e38 for 138) that would otherwise overflow a sleep or a timer, or wait forever, in a worker.
MAX_COUNT = 10**6  # report indices, attempts, `every`, report and call counts
MAX_SECONDS = 3600.0  # delay_s, duration_s, grace_s, time_s (and the runner's hang_timeout_s)


class Trigger(BaseModel):
    """When a fault fires, checked at each report: one of ``report``, ``metric``, ``time_s``,
    optionally narrowed to one ``attempt`` (``attempt`` alone: the first report of that attempt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report: Optional[int] = Field(None, ge=1, le=MAX_COUNT,
                                  description="report index (1-based) at which the fault fires")
    metric: Optional[dict[str, Any]] = Field(
        None, description="{name: value}: the first report whose metric `name` equals `value`")
    time_s: Optional[float] = Field(None, ge=0, le=MAX_SECONDS, description="the first report at least this many "
                                                                           "seconds after the run started")
    attempt: Optional[int] = Field(None, ge=1, le=MAX_COUNT, description="only in this attempt (1 = the first)")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("report", "metric", "time_s") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"give one of report, metric, time_s (got {', '.join(kinds)})")
        if not kinds and self.attempt is None:
            raise ValueError("give one of report, metric, time_s or attempt")
        if self.metric is not None and len(self.metric) != 1:
            raise ValueError("metric takes exactly one {name: value} pair")
        return self


class _Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = Field(None, description="an id for the fault in events (default: fault<position>)")
    rank: Optional[Union[int, list[int], Literal["any", "random"]]] = Field(
        None, description="world rank(s) where it fires; `any`: the first rank to get there; `random`: one rank "
                          "chosen with the plan's seed. Default 0. For node actions: the rank that triggers it")
    at: Trigger = Field(description="when the fault fires")
    every: Optional[float] = Field(None, gt=0, le=MAX_COUNT, description="fire again every N reports (report "
                                                                         "trigger) or N seconds (time_s trigger); "
                                                                         "default: once")
    when: Literal["before", "after"] = Field("before", description="fire before the report barrier "
                                                                   "(the report is not committed) or after it")
    optional: bool = Field(False, description="true: the scenario passes even if this fault never fires "
                                              "(default: a fault that never fired fails the scenario)")

    @field_validator("rank")
    @classmethod
    def _ranks_ok(cls, v):
        ranks = v if isinstance(v, list) else [v] if isinstance(v, int) else []
        if any(r < 0 for r in ranks):
            raise ValueError("world ranks are >= 0")
        if isinstance(v, list) and not v:
            raise ValueError("give at least one rank")
        return v

    @model_validator(mode="after")
    def _every_ok(self):
        if self.every is not None and self.at.report is None and self.at.time_s is None:
            raise ValueError("`every` needs an `at: {report: k}` or `at: {time_s: t}` trigger")
        if self.every is not None and self.at.report is not None and self.every != int(self.every):
            raise ValueError("`every` counts reports with a report trigger: give an int")
        return self


class KillWorker(_Fault):
    """Kill the rank's process with a signal (SIGKILL by default): a crash, a segfault, an OOM kill."""

    action: Literal["kill_worker"]
    signal: Union[Annotated[int, Field(ge=1, le=64)], str] = Field(
        "SIGKILL", description="signal name (SIGKILL, SIGTERM, ...) or number (1..64)")

    @field_validator("signal")
    @classmethod
    def _signal_ok(cls, v):
        if isinstance(v, str) and v.upper() not in _SIGNALS:
            raise ValueError(f"signal {v!r} is not one of {', '.join(_SIGNALS)} (or a number)")
        return v.upper() if isinstance(v, str) else v


class KillNode(_Fault):
    """Remove a whole node of the cluster at once (every process on it dies). The triggering rank pauses
    until the node is gone."""

    action: Literal["kill_node"]
    node: int = Field(ge=0, description="node index in the scenario's cluster (0-based)")


class Preempt(_Fault):
    """A preemption notice: SIGTERM to the rank (``rank:``) or to every rank of a node (``node:``), then
    after ``grace_s`` the process is killed (the node removed). The function sees
    ``get_context().is_preempted()`` and can checkpoint in time."""

    action: Literal["preempt"]
    node: Optional[int] = Field(None, ge=0, description="preempt this node (index) instead of one rank")
    grace_s: float = Field(5.0, ge=0, le=MAX_SECONDS, description="seconds between the notice and the kill")


class Hang(_Fault):
    """Block the rank (as a deadlock or a stuck collective would), for ``duration_s`` or forever."""

    action: Literal["hang"]
    duration_s: Optional[float] = Field(None, gt=0, le=MAX_SECONDS, description="seconds to block; default: forever")


class Raise(_Fault):
    """Raise an exception in the training function, from inside ``report()``."""

    action: Literal["raise"]
    exception: str = Field("RuntimeError", description="a builtin exception name or `module:Name`")
    message: str = Field("injected fault", description="the exception's message")

    @field_validator("exception")
    @classmethod
    def _exception_ok(cls, v):
        exception_class(v)  # unknown names fail before any worker starts
        return v


class Slow(_Fault):
    """Delay the rank's reports by ``delay_s`` each (a straggler), from the trigger on."""

    action: Literal["slow"]
    delay_s: float = Field(gt=0, le=MAX_SECONDS, description="seconds added to each report")
    reports: Optional[int] = Field(None, ge=1, le=MAX_COUNT,
                                   description="how many reports are slowed (default: the rest)")


class StorageFault(_Fault):
    """Make the next ``count`` storage calls of ``operation`` in the rank's process fail with ``error``.
    Storage retries them (``trainkit.storage.WRITE_TRIES`` tries), so a count below that is survived."""

    action: Literal["storage_error"]
    operation: Literal["upload", "write", "any"] = Field(
        "any", description="upload: checkpoint files copied to storage; write: other writes")
    count: int = Field(1, ge=1, le=MAX_COUNT, description="how many calls fail")
    error: str = Field("SlowDown: please reduce your request rate (injected)",
                       description="the OSError's message")


class AddNode(_Fault):
    """Add a node to the cluster (capacity returns; an elastic group grows back)."""

    action: Literal["add_node"]
    cpus: Optional[int] = Field(None, ge=0, le=16, description="its CPUs (default: the cluster's cpus_per_node)")


Fault = Annotated[Union[KillWorker, KillNode, Preempt, Hang, Raise, Slow, StorageFault, AddNode],
                  Field(discriminator="action")]
FAULT_CLASSES = {c.model_fields["action"].annotation.__args__[0]: c
                 for c in (KillWorker, KillNode, Preempt, Hang, Raise, Slow, StorageFault, AddNode)}


def fault_id(fault: _Fault, position: int) -> str:
    return fault.name or f"fault{position}"


def describe(fault: _Fault, fid: str) -> str:
    """``fault0 kill_worker rank 1 at report 3``: the fault, its target and its trigger, for verdict rows."""
    parts = [fid, fault.action]
    r = fault.rank
    ranks = (f"rank {r}" if isinstance(r, int) else f"ranks {', '.join(map(str, r))}" if isinstance(r, list)
             else {"any": "any rank", "random": "a random rank"}.get(r, "rank 0"))
    if is_node_fault(fault):  # the rank only triggers it: named when the scenario names it
        if getattr(fault, "node", None) is not None:
            parts.append(f"node {fault.node}")
        if r is not None:
            parts.append(f"via {ranks}")
    else:
        parts.append(ranks)
    t = fault.at
    word = "after" if fault.when == "after" else "at"
    if t.report is not None:
        parts.append(f"{word} report {t.report}" + (f" of attempt {t.attempt}" if t.attempt is not None else ""))
    elif t.metric is not None:
        (name, value), = t.metric.items()
        parts.append(f"{word} metric {name}={value}" + (f" in attempt {t.attempt}" if t.attempt is not None else ""))
    elif t.time_s is not None:
        parts.append(f"{word} {t.time_s:g} s" + (f" in attempt {t.attempt}" if t.attempt is not None else ""))
    else:
        parts.append(f"{word} the first report of attempt {t.attempt}")
    if fault.every is not None:
        unit = ("report" if fault.every == 1 else "reports") if t.report is not None else "s"
        parts.append(f"every {unit}" if unit == "report" else f"every {fault.every:g} {unit}")
    return " ".join(parts)


def is_node_fault(fault: _Fault) -> bool:
    """Done by the driver-side broker (node removal, node addition, preempting a node)."""
    return fault.action in NODE_ACTIONS or (fault.action == "preempt" and getattr(fault, "node", None) is not None)


def target_ranks(fault: _Fault, fid: str, seed: int, world_size: int) -> Optional[set[int]]:
    """World ranks where the fault may fire; None means any rank (the first to claim it)."""
    r = fault.rank
    if r == "any":
        return None
    if r == "random":
        return {random.Random(f"{seed}:{fid}").randrange(max(world_size, 1))}
    if r is None:
        return {0}
    return set(r) if isinstance(r, list) else {r}


def firing_key(fault: _Fault, fid: str, *, index: int, attempt: int, first_of_attempt: bool,
               metrics: dict, elapsed_s: float, world_rank: int) -> Optional[str]:
    """The key of the firing that happens at this report, or None when the trigger does not match.

    Pure: the same report in a replay gives the same key. The rank is part of the key when the
    fault targets several ranks (each fires its own); ``any``/``random``/one rank fire once.
    """
    t = fault.at
    if t.attempt is not None and attempt != t.attempt:
        return None
    key = fid if t.attempt is None else f"{fid}@a{t.attempt}"
    if t.report is not None:
        if fault.every is None:
            if index != t.report:
                return None
        elif index < t.report or (index - t.report) % int(fault.every):
            return None
        key += f"@r{index}"
    elif t.metric is not None:
        (name, want), = t.metric.items()
        if name not in metrics or not _equal(metrics[name], want):
            return None
    elif t.time_s is not None:
        if elapsed_s < t.time_s:
            return None
        if fault.every is not None:
            key += f"@t{int((elapsed_s - t.time_s) // fault.every)}"
    elif not first_of_attempt:  # attempt alone: its first report
        return None
    if isinstance(fault.rank, list):
        key += f"@rank{world_rank}"
    return key


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def exception_class(name: str) -> type:
    """``ValueError`` -> the builtin; ``pkg.mod:Name`` -> imported. Raises ValueError when unknown."""
    import builtins
    import importlib

    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import exception {name!r}: {e}") from None
    else:
        cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise ValueError(f"{name!r} is not an exception class (use a builtin name or `module:Name`)")
    return cls


def signal_number(sig: Union[int, str]) -> int:
    import signal as _signal

    return int(sig) if isinstance(sig, int) else int(getattr(_signal, sig))
