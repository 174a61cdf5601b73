"""The one exception tree of trainkit.

Every error trainkit raises on purpose is a ``TrainkitError``. User mistakes that a
setting can fix are ``ConfigError`` (also a ``ValueError``) and name the field, the
value seen and what is allowed. Failures of a run are ``TrainingFailedError`` and its
kinds, as in Ray Train V2.

Invariant: every exception here survives ``pickle`` (they cross Ray process
boundaries), so each one that takes more than a message defines ``__reduce__``.
Runs in every process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class TrainkitError(Exception):
    """Root of every exception trainkit raises on purpose."""


class ConfigError(TrainkitError, ValueError):
    """A setting is invalid. The message names the field, the value and what is allowed.

    >>> raise ConfigError("ScalingConfig.num_workers", -1, "an int >= 0 or a (min, max) tuple")
    Traceback (most recent call last):
    ...
    trainkit.errors.ConfigError: ScalingConfig.num_workers=-1 is invalid: expected an int >= 0 or a (min, max) tuple
    """

    def __init__(self, field_name: str, value: Any = None, allowed: str = "", *, hint: str = ""):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        self.hint = hint
        if allowed:
            msg = f"{field_name}={value!r} is invalid: expected {allowed}"
        else:
            msg = field_name  # free-form message
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __reduce__(self):
        return (_rebuild_config_error, (type(self), self.field, self.value, self.allowed, self.hint))


def _rebuild_config_error(cls, field_name, value, allowed, hint):
    return cls(field_name, value, allowed, hint=hint)


class ScenarioError(ConfigError):
    """A scenario file or fault plan is invalid: names the file, line and key path."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None, suggestion: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        self.suggestion = suggestion
        self.message = message
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        text = f"{where}{message}"
        if suggestion:
            text += f" (did you mean {suggestion!r}?)"
        TrainkitError.__init__(self, text)
        self.field = key or ""
        self.value = None
        self.allowed = ""
        self.hint = ""

    def __reduce__(self):
        return (_rebuild_scenario_error, (type(self), self.message, self.path, self.line, self.key,
                                          self.suggestion))


def _rebuild_scenario_error(cls, message, path, line, key, suggestion):
    return cls(message, path=path, line=line, key=key, suggestion=suggestion)


class DeprecatedSettingError(ConfigError, DeprecationWarning):
    """A setting Ray Train V2 removed was given. Ray raises ``DeprecationWarning`` for these; this
    error is both that and a ``ConfigError``, so code written for either catches it.

    >>> str(DeprecatedSettingError("RunConfig.verbose", "a Ray Tune setting"))
    'RunConfig.verbose is not supported: a Ray Tune setting'
    """

    def __init__(self, field_name: str, why: str = ""):
        TrainkitError.__init__(self, f"{field_name} is not supported: {why}" if why else
                               f"{field_name} is not supported")
        self.field, self.value, self.allowed, self.hint = field_name, None, "", ""
        self.why = why

    def __reduce__(self):
        return (type(self), (self.field, self.why))


class MissingExtraError(TrainkitError, ImportError):
    """A feature needs an optional dependency group (an "extra") that is not installed.

    The message names the feature, the missing modules and the extra; ``hint`` is the exact
    pip command that installs it.
    """

    def __init__(self, feature: str, extra: str, missing: list[str] | tuple[str, ...], hint: str):
        self.feature = feature
        self.extra = extra
        self.missing = tuple(missing)
        self.hint = hint
        super().__init__(f"{feature} needs the '{extra}' extra (not installed: {', '.join(self.missing)}); "
                         f"install it with: {hint}")

    def __reduce__(self):
        return (type(self), (self.feature, self.extra, self.missing, self.hint))


class StorageError(TrainkitError):
    """The run's storage cannot be reached, read or written."""


class RunOwnedError(ConfigError, StorageError):
    """The run folder belongs to another driver: its lease (``owner.json``) is live.

    Raised at once by a second ``fit()`` with the same ``RunConfig.name`` and
    ``storage_path``, and by a driver whose run another driver has taken over. The message
    names the owner (host, pid, since when) and what to do; ``owner`` is its lease as data.

    >>> str(RunOwnedError("run /r/x is owned by pid 7 on h", {"pid": 7, "host": "h"}))
    'run /r/x is owned by pid 7 on h'
    """

    def __init__(self, message: str, owner: dict | None = None):
        ConfigError.__init__(self, message)
        self.message = message
        self.owner = dict(owner or {})

    def __reduce__(self):
        return (type(self), (self.message, self.owner))


class OutputError(TrainkitError):
    """A command cannot write a file it was told to write (``--json OUT``, ``--plot OUT``)."""


class CheckpointError(TrainkitError):
    """A checkpoint cannot be committed or read (missing folder, ranks disagreeing on checkpoint_dir_name)."""


class SessionError(TrainkitError, RuntimeError):
    """A per-rank API (``report``, ``get_context``, ...) was called outside a training function."""


class ReportError(TrainkitError):
    """``report()`` or a collective was used inconsistently across ranks."""


@dataclass
class WorkerFailure:
    """What is known of one failed rank, JSON-serialisable (no exception objects)."""

    world_rank: int
    node_id: str = ""
    pid: int | None = None
    kind: str = "exception"  # exception | collective | storage | died | oom | hang | preempted | mismatch | callback
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    exit_code: int | None = None
    memory: dict | None = None  # kind "oom": its last RSS samples, limit and the node's memory
    peer_rank: int | None = None  # kind "collective": the peer the gloo/NCCL message names, when it does

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerFailure":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def headline(self) -> str:
        """``rank 1 (node 5f0c1a2b3c4d, pid 4242): ValueError: boom``: which rank failed, and how."""
        return f"{self.where()}: {self.what()}"

    def where(self, *, exit_code: bool = True) -> str:
        """``rank 1 (node 5f0c1a2b3c4d, pid 4242, exit code -9)``; the parts not known are left out.

        >>> WorkerFailure(1, node_id="5f0c1a2b3c4d5e6f", pid=4242).where()
        'rank 1 (node 5f0c1a2b3c4d, pid 4242)'
        """
        where = f"rank {self.world_rank}"
        extra = []
        if self.node_id:
            extra.append(f"node {str(self.node_id)[:12]}")
        if self.pid:
            extra.append(f"pid {self.pid}")
        if exit_code and self.exit_code is not None:
            extra.append(f"exit code {self.exit_code}")
        if extra:
            where += " (" + ", ".join(extra) + ")"
        return where

    def what(self) -> str:
        """``ValueError: boom`` (the exception type and message), or the message alone."""
        return f"{self.exc_type}: {self.message}" if self.exc_type else self.message


@dataclass(frozen=True)
class PreemptionInfo:
    """An imminent preemption (Ray's ``ray.train.PreemptionInfo``): ``deadline_ms``, the earliest
    deadline across the noticed nodes (UNIX time in ms; None when the notice gave none), and
    ``preempted_node_to_ranks``, node id -> the world ranks on it. ``get_preemption_info()``
    returns one; so does ``PreemptionError.preemption_info``."""

    deadline_ms: int | None
    preempted_node_to_ranks: dict

    @property
    def preempted_node_ids(self) -> list:
        return sorted(self.preempted_node_to_ranks)

    @property
    def preempted_ranks(self) -> list:
        return sorted({r for ranks in self.preempted_node_to_ranks.values() for r in ranks})


class TrainingFailedError(TrainkitError):
    """A run failed for good (retries exhausted or not retryable), as in Ray Train V2.

    ``failures`` lists the failed ranks, root cause first.
    """

    _prefix = "Training failed"

    def __init__(self, message: str = "", failures: list[WorkerFailure] | None = None):
        self.message = message
        self.failures = list(failures or [])
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"{self._prefix}: {self.message}" if self.message else self._prefix]
        for f in self.failures:
            parts.append(f"[{f.headline()}]")
            if f.traceback:
                parts.append(f.traceback.rstrip())
        return "\n".join(parts)

    @property
    def worker_failures(self) -> dict[int, WorkerFailure]:
        """Ray Train V2's spelling: world rank -> failure record."""
        return {f.world_rank: f for f in self.failures}

    def __reduce__(self):
        return (_rebuild_failed, (type(self), self.message, [f.to_dict() for f in self.failures]))

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "message": self.message,
                "failures": [f.to_dict() for f in self.failures]}

    @staticmethod
    def from_dict(d: dict) -> "TrainingFailedError":
        """Rebuild from ``to_dict()`` output (used by ``Result.from_path``; no unpickling)."""
        cls = _FAILED_KINDS.get(d.get("type", ""), TrainingFailedError)
        return cls(d.get("message", ""), [WorkerFailure.from_dict(f) for f in d.get("failures", [])])


def _rebuild_failed(cls, message, failures):
    return cls(message, [WorkerFailure.from_dict(f) for f in failures])


class WorkerGroupError(TrainingFailedError):
    """One or more ranks raised, died or disagreed; retries are exhausted."""

    _prefix = "Training failed due to worker errors"


class StorageFailedError(WorkerGroupError, StorageError):
    """The run's storage cannot take it any more (full, read-only, forbidden): a rank's checkpoint
    upload or the controller's commit failed with an error no retry can fix. Not retried, whatever
    ``max_failures`` says; both a ``TrainingFailedError`` (``Result.error``) and a ``StorageError``."""

    _prefix = "Training failed due to its storage"


class ControllerError(TrainingFailedError):
    """The controller failed (bad callback, resources that can never be had, internal error)."""

    _prefix = "Training failed due to controller error"


class HangDetectedError(WorkerGroupError):
    """Ranks waited at a report barrier for longer than the hang timeout."""

    _prefix = "Training failed due to a hang"


class NCCLHangError(HangDetectedError):
    """A hang inside an NCCL collective (Ray's ``ray.train.NCCLHangError``, a ``WorkerGroupError``).

    trainkit names it where the hung ranks' stacks are inside a ``torch.distributed`` call on
    the NCCL backend; everything ``HangDetectedError`` says holds.
    """

    _prefix = "Training failed due to an NCCL hang"


class PreemptionError(TrainingFailedError):
    """The run was preempted more often than ``FailureConfig.max_preemptions`` allows (Ray's
    ``ray.train.PreemptionError``). ``preemption_info`` is a ``trainkit.PreemptionInfo``: which
    nodes' ranks were preempted; ``drain_timed_out`` is False (trainkit stops a noticed group at
    its next committed report, not at the drain deadline)."""

    _prefix = "Training failed due to preemption"

    def __init__(self, message: str = "", failures: list[WorkerFailure] | None = None, *,
                 preemption_info: Any = None, drain_timed_out: bool = False):
        super().__init__(message, failures)
        if preemption_info is None:
            nodes: dict = {}
            for f in self.failures:
                if f.kind == "preempted":
                    nodes.setdefault(f.node_id, []).append(f.world_rank)
            preemption_info = PreemptionInfo(None, {n: sorted(r) for n, r in nodes.items()})
        self.preemption_info = preemption_info
        self.drain_timed_out = drain_timed_out

    def __reduce__(self):
        return (_rebuild_preemption, (type(self), self.message, [f.to_dict() for f in self.failures],
                                      self.preemption_info, self.drain_timed_out))


def _rebuild_preemption(cls, message, failures, info, drain_timed_out):
    return cls(message, [WorkerFailure.from_dict(f) for f in failures], preemption_info=info,
               drain_timed_out=drain_timed_out)


_FAILED_KINDS = {c.__name__: c for c in (TrainingFailedError, WorkerGroupError, ControllerError,
                                         HangDetectedError, StorageFailedError, NCCLHangError, PreemptionError)}

__all__ = [
    "TrainkitError", "ConfigError", "ScenarioError", "StorageError", "RunOwnedError", "StorageFailedError", "CheckpointError", "ReportError", "SessionError",
    "WorkerFailure", "TrainingFailedError", "WorkerGroupError", "ControllerError", "HangDetectedError",
    "NCCLHangError", "PreemptionError", "DeprecatedSettingError",
]
