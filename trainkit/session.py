"""The per-rank API: ``report``, ``get_checkpoint``, ``get_context``, ``get_dataset_shard``.

A ``Session`` exists in a process while a training function runs there (the driver
in local mode, each torchrun process, each Ray worker actor). It does the rank's half of
a report (validate metrics, copy the checkpoint folder into the run directory) and hands
the rest to a ``Coordinator``, which returns once every rank of the group arrived and
the report is committed. Coordinators differ per mode: inline (local mode),
torch.distributed (torchrun), the controller actor (``ray`` backend).

Report indices are 1-based and follow the training's history: an attempt that resumes
from the checkpoint of report k makes report k+1 next.
"""

from __future__ import annotations

import functools
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from trainkit.checkpoint import Checkpoint
from trainkit.errors import ConfigError, SessionError
from trainkit.storage import RunStore, check_checkpoint_dir_name


@dataclass(frozen=True)
class RankInfo:
    world_rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    node_id: str = ""
    attempt: int = 1


@dataclass(frozen=True)
class ReportReply:
    checkpoint_dir: Optional[str] = None  # the committed checkpoint folder, if this round had one
    # The round was committed and the attempt ends with it (a preempted group stops after its next
    # commit): raised once the report is complete on this rank, after-report hooks included.
    then_raise: Optional[BaseException] = None


@dataclass(frozen=True)
class ReportedCheckpoint:
    checkpoint: Checkpoint
    metrics: dict


class Coordinator(Protocol):
    def report(self, world_rank: int, index: int, metrics: Optional[dict], checkpoint_dir: Optional[str],
               files: Optional[list]) -> ReportReply: ...

    def collective(self, world_rank: int, op: str, seq: int, payload: Any) -> Any: ...

    def reported_checkpoints(self) -> list: ...


class ReportHook(Protocol):
    """Called in the rank's process around each report (fault injection uses this seam)."""

    def before_report(self, ctx: "TrainContext", index: int, metrics: dict) -> None: ...

    def after_report(self, ctx: "TrainContext", index: int, metrics: dict) -> None: ...


def _find_tensor(obj: Any, path: str = "") -> Optional[str]:
    t = type(obj)
    if t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter"):
        return path or "<metrics>"
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = _find_tensor(v, f"{path}[{k!r}]")
            if hit:
                return hit
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = _find_tensor(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


_JSON_VALUES = "a JSON value: a number, a string, True/False, None, or a list or dict of them"


def _type_name(v: Any) -> str:
    t = type(v)
    return f"<{t.__qualname__}>" if t.__module__ == "builtins" else f"<{t.__module__}.{t.__qualname__}>"


def _plain(v: Any, path: str) -> Any:
    """``v`` as plain JSON types (numpy scalars become Python numbers); ConfigError naming ``path`` else."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(v, np.generic):  # np.float64 is also a float: made plain here too
        item = v.item()
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise ConfigError(f"report(metrics){path} key", _type_name(k), "a string key")
            out[k] = _plain(x, f"{path}[{k!r}]")
        return out
    if isinstance(v, (list, tuple)):
        return [_plain(x, f"{path}[{i}]") for i, x in enumerate(v)]
    where = f"report(metrics){path}"
    if np is not None and isinstance(v, np.ndarray):
        raise ConfigError(where, _type_name(v), _JSON_VALUES,
                          hint="call .item() on a one-element array, .tolist() on others, before reporting")
    if isinstance(v, (bytes, bytearray)):
        raise ConfigError(where, _type_name(v), _JSON_VALUES, hint="decode bytes to a string before reporting")
    raise ConfigError(where, _type_name(v), _JSON_VALUES,
                      hint="metrics are stored as JSON in run_state.json and events.jsonl; report numbers, "
                           "strings and lists of them")


def validate_metrics(metrics: Any) -> dict:
    """Check a report's metrics before anything is written; returns them as plain JSON types
    (numpy scalars become Python numbers). A value JSON cannot hold raises ``ConfigError`` naming
    its key.

    >>> validate_metrics({"loss": 0.5, "epoch": 1})
    {'loss': 0.5, 'epoch': 1}
    """
    if not isinstance(metrics, dict):
        raise ConfigError("report(metrics)", type(metrics).__name__, "a dict of metric name -> value")
    hit = _find_tensor(metrics)
    if hit:
        raise ConfigError(f"report(metrics){hit}", "a torch.Tensor",
                          "plain Python values: call .item() (or .tolist()) on tensors before reporting")
    return _plain(metrics, "")


class Session:
    """One rank's view of its run: what ``report``, ``get_checkpoint``, ``get_context`` talk to.

    A backend makes one per rank and installs it (``trainkit.backends.api.install_session``).
    """

    def __init__(self, info: RankInfo, store: RunStore, coordinator: Coordinator, *, experiment_name: str,
                 start_checkpoint: Optional[Checkpoint] = None, start_index: int = 0,
                 datasets: Optional[dict] = None, hooks: Optional[list] = None,
                 preempted: Optional[threading.Event] = None):
        self.info = info
        self.store = store
        self.coordinator = coordinator
        self.experiment_name = experiment_name
        self.checkpoint = start_checkpoint
        self.index = start_index
        self.datasets = datasets or {}
        self.hooks = list(hooks or [])
        self.preempted = preempted or threading.Event()
        self._seq: dict[str, int] = {}
        self._shards: dict[str, Any] = {}
        self.context = TrainContext(self)

    def report(self, metrics: dict, checkpoint: Optional[Checkpoint] = None,
               checkpoint_dir_name: Optional[str] = None) -> None:
        metrics = validate_metrics(metrics)
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise ConfigError("report(checkpoint)", type(checkpoint).__name__, "a trainkit.Checkpoint or None")
        index = self.index + 1  # advanced only once the report is committed: a retry reuses it
        dir_name = files = None
        if checkpoint is not None:
            dir_name = checkpoint_dir_name or f"checkpoint_{index}"
            check_checkpoint_dir_name(dir_name)
        for h in self.hooks:
            fn = getattr(h, "before_report", None)
            if fn:
                fn(self.context, index, metrics)
        if checkpoint is not None:
            files = self.store.upload_dir(checkpoint.filesystem, checkpoint.path, dir_name)
        reply = self.coordinator.report(self.info.world_rank, index,
                                        metrics if self.info.world_rank == 0 else None, dir_name, files)
        self.index = index
        if reply.checkpoint_dir:
            self.checkpoint = Checkpoint(self.store.path(reply.checkpoint_dir), self.store.fs)
        for h in self.hooks:
            fn = getattr(h, "after_report", None)
            if fn:
                fn(self.context, index, metrics)
        if reply.then_raise is not None:
            raise reply.then_raise

    def collective(self, op: str, payload: Any = None) -> Any:
        seq = self._seq.get(op, 0) + 1
        self._seq[op] = seq
        return self.coordinator.collective(self.info.world_rank, op, seq, payload)

    def get_dataset_shard(self, name: Optional[str], state_dict: Any = None):
        if name not in self.datasets:
            raise KeyError(f"Dataset shard for {name!r} not found: the trainer has datasets "
                           f"{sorted(self.datasets)}. Pass datasets={{{name!r}: ...}} to the trainer.")
        if name not in self._shards or state_dict is not None:
            self._shards[name] = rank_shard(self, name, state_dict)
        return self._shards[name]


def rank_device(info: "RankInfo"):
    """The ``torch.device`` of the rank described by ``info``: its GPU (``cuda:<local index>``) when it
    has one, else CPU. ``trainkit.torch.get_device()`` and the "auto" device of torch batches."""
    import os

    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() == "":
            return torch.device("cpu")
        if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        if info.world_size == 1:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def rank_shard(session, name: str, state_dict: Any = None):
    """This rank's shard of ``session.datasets[name]``, with the rank's report hooks that have
    ``on_batch`` listening to its batches. ``session`` is any per-rank session (``Session``, or a
    backend's forwarding session) with ``datasets``, ``hooks``, ``context`` and ``info``."""
    from trainkit.data import make_shard

    ctx = session.context
    listeners = [(lambda n, e, ids, h=h: h.on_batch(ctx, n, e, ids)) for h in session.hooks if hasattr(h, "on_batch")]
    return make_shard(session.datasets[name], session.info.world_rank, session.info.world_size,
                      name=name, state_dict=state_dict, listeners=listeners,
                      default_device=functools.partial(rank_device, session.info))


class TrainContext:
    """What a rank knows about itself and its run (``trainkit.get_context()``)."""

    def __init__(self, session: Session):
        self._s = session

    def get_world_rank(self) -> int:
        return self._s.info.world_rank

    def get_world_size(self) -> int:
        return self._s.info.world_size

    def get_local_rank(self) -> int:
        return self._s.info.local_rank

    def get_local_world_size(self) -> int:
        return self._s.info.local_world_size

    def get_node_rank(self) -> int:
        return self._s.info.node_rank

    def get_node_id(self) -> str:
        return self._s.info.node_id

    def get_attempt(self) -> int:
        """1 for the first attempt of the run, then +1 per restart or resize. Attempts continue across
        ``fit()`` calls of the same run (name and storage_path): a resumed run starts above 1."""
        return self._s.info.attempt

    def get_experiment_name(self) -> str:
        return self._s.experiment_name

    def get_storage(self) -> RunStore:
        return self._s.store

    def get_report_index(self) -> int:
        """Index of the last committed report of this rank (0 before the first)."""
        return self._s.index

    def is_preempted(self) -> bool:
        """True once this rank was told to stop soon (SIGTERM, drained node): save a checkpoint."""
        return self._s.preempted.is_set()


_current: Optional[Session] = None
_lock = threading.Lock()


def set_session(s: Optional[Session]) -> None:
    global _current
    with _lock:
        _current = s


def current_session(fn_name: str) -> Session:
    s = _current
    if s is None:
        raise SessionError(f"`{fn_name}` cannot be used outside of a trainkit training function: call it "
                           "inside the function you pass to TorchTrainer(...).fit()")
    return s


# -- public functions --------------------------------------------------------------------------
def report(metrics: dict, checkpoint: Optional[Checkpoint] = None, checkpoint_dir_name: Optional[str] = None,
           **_ignored: Any) -> None:
    """Report metrics (and optionally a checkpoint) for this step. A barrier across ranks.

    Returns on every rank once all ranks reported this index and the checkpoint is
    committed. Metrics come from rank 0; checkpoint files from all ranks that pass one
    are merged into one folder (names must not collide).

    >>> trainkit.report({"loss": loss.item()}, checkpoint=Checkpoint.from_directory(d))  # doctest: +SKIP
    """
    current_session("report").report(metrics, checkpoint, checkpoint_dir_name)


def get_checkpoint() -> Optional[Checkpoint]:
    """The checkpoint to resume from: the latest committed one (None at the start of a fresh run)."""
    return current_session("get_checkpoint").checkpoint


def get_all_reported_checkpoints() -> list[ReportedCheckpoint]:
    """The run's retained checkpoints with their metrics, oldest first."""
    s = current_session("get_all_reported_checkpoints")
    return [ReportedCheckpoint(Checkpoint(s.store.path(d), s.store.fs), m)
            for d, m in s.coordinator.reported_checkpoints()]


def get_context() -> TrainContext:
    """This rank's ``TrainContext`` (world rank and size, local rank, node rank, storage, attempt)."""
    return current_session("get_context").context


def get_dataset_shard(dataset_name: Optional[str] = None, state_dict: Any = None):
    """This rank's shard of ``datasets[dataset_name]`` passed to the trainer.

    ``state_dict``: a state saved from ``shard.state_dict()`` (this rank's) or the list of
    every rank's states, to resume mid-epoch (see ``trainkit.data`` and docs/data.md).
    """
    return current_session("get_dataset_shard").get_dataset_shard(dataset_name, state_dict)


def record_fault(fields: dict) -> bool:
    """The fault-injection seam: put a ``fault_injected`` event (its fields as a dict) into the run's
    event stream through this rank's coordinator. False when a fault with the same ``detail["key"]``
    already fired in this run (True where the coordinator keeps no stream, e.g. torchrun ranks > 0)."""
    fn = getattr(current_session("record_fault").coordinator, "record_fault", None)
    return bool(fn(fields)) if fn is not None else True


__all__ = ["report", "get_checkpoint", "get_all_reported_checkpoints", "get_context", "get_dataset_shard",
           "TrainContext", "ReportedCheckpoint", "RankInfo", "ReportReply", "Coordinator"]
