"""The per-rank API: ``report``, ``get_checkpoint``, ``get_context``, ``get_dataset_shard``.

A ``Session`` exists in a process while a training function runs there (the driver
in local mode, each torchrun process, each Ray worker actor). It does the rank's half of
a report (validate metrics, copy the checkpoint folder into the run directory) and hands
the rest to a ``Coordinator``, which returns once every rank of the group arrived and
the report is committed. Coordinators differ per mode: inline (local mode),
torch.distributed (torchrun), the controller actor (``ray`` backend).

Report indices are 1-based and follow the training's history: an attempt that resumes
from the checkpoint of report k makes report k+1 next.

Ray's report options live here too. An ASYNC report's copy and round run in one background
thread of the rank, one report at a time: the rank's next report, collective or
``get_all_reported_checkpoints`` waits for it first, and so does ``Session.drain()``, which
the backend calls when the function returned (the durability rule of docs/api.md). World
rank 0 validates the committed checkpoints reported with ``validation=...`` in another
background thread and hands the results to its coordinator (``validated``), which merges
them into the checkpoints' manifest entries.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union

from trainkit.checkpoint import Checkpoint
from trainkit.config import CheckpointConsistencyMode, CheckpointUploadMode, ValidationTaskConfig
from trainkit.errors import ConfigError, PreemptionInfo, SessionError
from trainkit.storage import RunStore, check_checkpoint_dir_name, is_local

logger = logging.getLogger("trainkit")


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


class ReportedCheckpointStatus(enum.Enum):
    """Where a reported checkpoint stands (Ray's ``ray.train.ReportedCheckpointStatus``)."""

    COMMITTED = "COMMITTED"  # committed; no validation was asked for
    PENDING_VALIDATION = "PENDING_VALIDATION"  # committed; its validation has not finished
    VALIDATED = "VALIDATED"  # committed and validated: its metrics include the validation's
    VALIDATION_TIMEOUT = "VALIDATION_TIMEOUT"  # the validation ran past ValidationTaskConfig.timeout_s
    VALIDATION_FAILED = "VALIDATION_FAILED"  # the validation function raised (or returned no dict)


@dataclass(frozen=True)
class ReportedCheckpoint:
    """A committed checkpoint with its metrics and status (``get_all_reported_checkpoints()``)."""

    checkpoint: Checkpoint
    metrics: dict
    status: ReportedCheckpointStatus = ReportedCheckpointStatus.COMMITTED


class Coordinator(Protocol):
    def report(self, world_rank: int, index: int, metrics: Optional[dict], checkpoint_dir: Optional[str],
               files: Optional[list]) -> ReportReply: ...

    def collective(self, world_rank: int, op: str, seq: int, payload: Any) -> Any: ...

    def reported_checkpoints(self) -> list: ...  # (dir, metrics) or (dir, metrics, status) per checkpoint

    # optional: ``validated(checkpoint_dir, metrics, status)``, rank 0's validation results (RunLedger.validated)


class ReportHook(Protocol):
    """Called in the rank's process around each report (fault injection uses this seam)."""

    def before_report(self, ctx: "TrainContext", index: int, metrics: dict) -> None: ...

    def after_report(self, ctx: "TrainContext", index: int, metrics: dict) -> None: ...

    # optional: ``on_session_start(ctx)`` when the rank's session is made, before the function runs


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


_UPLOAD_MODES = ", ".join(f"CheckpointUploadMode.{m.name}" for m in CheckpointUploadMode)


def _upload_mode(mode: Any) -> CheckpointUploadMode:
    if isinstance(mode, CheckpointUploadMode):
        return mode
    for m in CheckpointUploadMode:  # Ray's enum (ray_train backend, a program that kept ray's import) or a name
        if getattr(mode, "value", mode) == m.value:
            return m
    raise ConfigError("report(checkpoint_upload_mode)", mode, _UPLOAD_MODES)


class _Validator:
    """World rank 0's validations: one at a time, in the order reported, in a background thread."""

    def __init__(self, session: "Session", config: Any):
        self.session = session
        self.config = config
        self.queue: list = []
        self.cond = threading.Condition()
        self.busy = False
        self.thread: Optional[threading.Thread] = None

    def submit(self, checkpoint_dir: str, task: Any) -> None:
        base = self.config.task_config
        kwargs = dict(base.fn_kwargs or {})
        timeout_s = base.timeout_s
        if isinstance(task, ValidationTaskConfig):
            kwargs.update(task.fn_kwargs or {})
            timeout_s = task.timeout_s if task.timeout_s is not None else timeout_s
        with self.cond:
            self.queue.append((checkpoint_dir, kwargs, timeout_s))
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="trainkit-validation", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                d, kwargs, timeout_s = self.queue.pop(0)
                self.busy = True
            try:
                self._validate(d, kwargs, timeout_s)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _validate(self, d: str, kwargs: dict, timeout_s: Optional[float]) -> None:
        s = self.session
        ckpt = Checkpoint(s.store.path(d), s.store.fs)
        box: dict = {}

        def call():
            try:
                box["value"] = self.config.fn(ckpt, **kwargs)
            except BaseException as e:  # noqa: BLE001 - a failed validation never fails training
                box["error"] = e

        t = threading.Thread(target=call, name="trainkit-validation-fn", daemon=True)
        t.start()
        t.join(timeout_s)
        metrics: dict = {}
        if t.is_alive():
            status = ReportedCheckpointStatus.VALIDATION_TIMEOUT
            logger.warning("validation of %s ran past timeout_s=%s; marked %s", d, timeout_s, status.value)
        elif "error" in box or not isinstance(box.get("value"), dict):
            status = ReportedCheckpointStatus.VALIDATION_FAILED
            e = box.get("error")
            logger.warning("validation of %s failed: %s", d, f"{type(e).__name__}: {e}" if e is not None else
                           f"it returned {type(box.get('value')).__name__}, not a dict of metrics")
        else:
            status = ReportedCheckpointStatus.VALIDATED
            try:
                metrics = validate_metrics(box["value"])
            except ConfigError as e:
                status, metrics = ReportedCheckpointStatus.VALIDATION_FAILED, {}
                logger.warning("validation of %s returned metrics that cannot be stored: %s", d, e)
        fn = getattr(s.coordinator, "validated", None)
        if fn is None:
            logger.warning("this backend records no validation results; %s's are dropped", d)
            return
        try:
            fn(d, metrics, status.value)
        except BaseException as e:  # noqa: BLE001 - the attempt is over: the next one validates again
            logger.info("validation result of %s not recorded: %s", d, e)

    def wait(self, timeout_s: Optional[float] = None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.cond:
            while self.queue or self.busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left)
        return True


class Session:
    """One rank's view of its run: what ``report``, ``get_checkpoint``, ``get_context`` talk to.

    A backend makes one per rank and installs it (``trainkit.backends.api.install_session``), and
    calls ``drain()`` once the training function returned: an ASYNC report and rank 0's
    validations finish there, and count for the attempt.
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
        self._pending: Optional[threading.Thread] = None  # the ASYNC report being uploaded and committed
        self._pending_error: Optional[BaseException] = None
        # The run's ValidationConfig and LoggingConfig travel as worker hooks (trainkit.backends.api.worker_hooks).
        self.validation_config = next((h.validation_config for h in self.hooks
                                       if getattr(h, "validation_config", None) is not None), None)
        self._validator = (_Validator(self, self.validation_config)
                           if self.validation_config is not None and info.world_rank == 0 else None)
        for h in self.hooks:
            fn = getattr(h, "on_session_start", None)
            if fn:
                fn(self.context)

    # -- report ---------------------------------------------------------------------------
    def report(self, metrics: dict, checkpoint: Optional[Checkpoint] = None,
               checkpoint_dir_name: Optional[str] = None,
               checkpoint_upload_mode: Any = CheckpointUploadMode.SYNC,
               delete_local_checkpoint_after_upload: Optional[bool] = None,
               checkpoint_upload_fn: Optional[Callable[[Checkpoint, str], Checkpoint]] = None,
               validation: Union[bool, ValidationTaskConfig] = False) -> None:
        metrics = validate_metrics(metrics)
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise ConfigError("report(checkpoint)", type(checkpoint).__name__, "a trainkit.Checkpoint or None")
        mode = _upload_mode(checkpoint_upload_mode)
        if not isinstance(validation, (bool, ValidationTaskConfig)):
            raise ConfigError("report(validation)", validation, "True, False or a trainkit.ValidationTaskConfig")
        if validation is not False and checkpoint is None:
            raise ConfigError("Validation requires a checkpoint to be provided: report(validation=...) without "
                              "report(checkpoint=...)")
        if validation is not False and self.validation_config is None:
            raise ConfigError("`validation_config` was not set on the trainer, but a validation was requested "
                              "(report(validation=...)): pass TorchTrainer(validation_config=ValidationConfig(fn))")
        if checkpoint_upload_fn is not None and not callable(checkpoint_upload_fn):
            raise ConfigError("report(checkpoint_upload_fn)", checkpoint_upload_fn,
                              "None or a function (checkpoint, checkpoint_dir_name) -> Checkpoint")
        if delete_local_checkpoint_after_upload not in (None, True, False):
            raise ConfigError("report(delete_local_checkpoint_after_upload)", delete_local_checkpoint_after_upload,
                              "None, True or False")
        delete = (mode.default_delete_local_checkpoint_after_upload() if delete_local_checkpoint_after_upload is None
                  else delete_local_checkpoint_after_upload)
        self.drain_reports()  # one report at a time, in order: the previous ASYNC one commits first
        index = self.index + 1  # advanced only once the report is committed: a retry reuses it
        dir_name = None
        if checkpoint is not None:
            if mode is CheckpointUploadMode.NO_UPLOAD:
                dir_name = self._in_run_folder(checkpoint, checkpoint_dir_name)
            else:
                dir_name = checkpoint_dir_name or f"checkpoint_{index}"
                check_checkpoint_dir_name(dir_name)
                if delete and is_local(checkpoint.filesystem) and self._inside(checkpoint.path):
                    raise ConfigError("report(delete_local_checkpoint_after_upload)", True,
                                      "False when the run folder is inside the checkpoint folder "
                                      f"{checkpoint.path!r} (deleting it would delete the run)")
        for h in self.hooks:
            fn = getattr(h, "before_report", None)
            if fn:
                fn(self.context, index, metrics)
        job = functools.partial(self._persist, index, metrics, checkpoint, dir_name, mode, delete,
                                checkpoint_upload_fn, validation)
        if mode is CheckpointUploadMode.ASYNC and checkpoint is not None:
            self._pending = threading.Thread(target=self._run_pending, args=(job,),
                                             name=f"trainkit-report-{index}", daemon=True)
            self._pending.start()
            return
        job()

    def _inside(self, folder: str) -> bool:
        """Whether the run folder is ``folder`` or inside it (local storage only)."""
        if not self.store.local:
            return False
        run = os.path.abspath(self.store.run_path)
        folder = os.path.abspath(folder)
        return run == folder or run.startswith(folder.rstrip(os.sep) + os.sep)

    def _in_run_folder(self, checkpoint: Checkpoint, checkpoint_dir_name: Optional[str]) -> str:
        """NO_UPLOAD: the checkpoint's folder name, checked to be a folder of the run folder on its storage."""
        same_fs = is_local(checkpoint.filesystem) == self.store.local and (
            self.store.local or type(checkpoint.filesystem) is type(self.store.fs))
        parent, _, name = checkpoint.path.rstrip("/").rstrip(os.sep).replace(os.sep, "/").rpartition("/")
        run = self.store.run_path.rstrip("/").replace(os.sep, "/")
        if not same_fs or parent != run:
            raise ConfigError("report(checkpoint)", checkpoint.path,
                              f"with CheckpointUploadMode.NO_UPLOAD, a folder directly inside the run folder "
                              f"{self.store.uri} on its storage; this checkpoint is outside the experiment directory",
                              hint="write it to get_context().get_storage().experiment_fs_path + '/<name>', or "
                                   "use SYNC/ASYNC to have it copied there")
        if checkpoint_dir_name not in (None, name):
            raise ConfigError("report(checkpoint_dir_name)", checkpoint_dir_name,
                              f"None or {name!r} with NO_UPLOAD (the checkpoint is already at {checkpoint.path})")
        check_checkpoint_dir_name(name)
        return name

    def _upload(self, checkpoint: Checkpoint, dir_name: str, upload_fn) -> list:
        if upload_fn is None:
            return self.store.upload_dir(checkpoint.filesystem, checkpoint.path, dir_name)
        out = upload_fn(checkpoint, dir_name)
        if not isinstance(out, Checkpoint):
            raise ConfigError("report(checkpoint_upload_fn)", type(out).__name__,
                              "a function that returns a trainkit.Checkpoint")
        if out.path.rstrip("/").replace(os.sep, "/") != self.store.path(dir_name).replace(os.sep, "/"):
            raise ConfigError("report(checkpoint_upload_fn)", out.path,
                              f"a checkpoint at {self.store.path(dir_name)} (the run folder's {dir_name!r}, "
                              "on the run's storage): the function must upload to the folder name it is given")
        return sorted((self.store.file_sizes(dir_name) or {}).keys())

    def _persist(self, index, metrics, checkpoint, dir_name, mode, delete, upload_fn, validation) -> None:
        """Copy the checkpoint (unless NO_UPLOAD), arrive at the report barrier, take the commit."""
        files = None
        if checkpoint is not None:
            if mode is CheckpointUploadMode.NO_UPLOAD:
                files = sorted((self.store.file_sizes(dir_name) or {}).keys())
            else:
                files = self._upload(checkpoint, dir_name, upload_fn)
                if delete and is_local(checkpoint.filesystem) and os.path.isdir(checkpoint.path):
                    shutil.rmtree(checkpoint.path, ignore_errors=True)
        if self._validator is not None and validation is not False and dir_name is not None:
            mark = getattr(self.coordinator, "validated", None)
            if mark is not None:  # before the commit: no rank sees it committed but not pending
                mark(dir_name, {}, ReportedCheckpointStatus.PENDING_VALIDATION.value)
        reply = self.coordinator.report(self.info.world_rank, index, metrics, dir_name, files)
        self.index = index
        if reply.checkpoint_dir:
            self.checkpoint = Checkpoint(self.store.path(reply.checkpoint_dir), self.store.fs)
            if self._validator is not None and validation is not False:
                self._validator.submit(reply.checkpoint_dir, validation)
        for h in self.hooks:
            fn = getattr(h, "after_report", None)
            if fn:
                fn(self.context, index, metrics)
        if reply.then_raise is not None:
            raise reply.then_raise

    def _run_pending(self, job) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - raised in the training thread at its next call
            self._pending_error = e

    def drain_reports(self) -> None:
        """Wait for the ASYNC report in flight (its upload and commit); raise what it raised."""
        t = self._pending
        if t is not None:
            t.join()
            self._pending = None
        err, self._pending_error = self._pending_error, None
        if err is not None:
            raise err

    def drain(self) -> None:
        """The training function returned: finish the ASYNC report in flight and rank 0's validations."""
        self.drain_reports()
        if self._validator is not None:
            self._validator.wait()

    def collective(self, op: str, payload: Any = None) -> Any:
        self.drain_reports()
        seq = self._seq.get(op, 0) + 1
        self._seq[op] = seq
        return self.coordinator.collective(self.info.world_rank, op, seq, payload)

    def reported_checkpoints(self, consistency_mode: CheckpointConsistencyMode,
                             timeout_s: Optional[float]) -> list:
        self.drain_reports()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if consistency_mode is CheckpointConsistencyMode.VALIDATED and self._validator is not None:
            self._validator.wait(timeout_s)
        delay = 0.05
        while True:
            listing = self.coordinator.reported_checkpoints()
            pending = any(len(e) > 2 and e[2] == ReportedCheckpointStatus.PENDING_VALIDATION.value for e in listing)
            if (consistency_mode is not CheckpointConsistencyMode.VALIDATED or not pending
                    or (deadline is not None and time.monotonic() >= deadline)):
                return listing
            time.sleep(delay)  # another rank's validation: rank 0 records it when it ends
            delay = min(delay * 2, 1.0)

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

    # Ray Train V2 removed these (Ray Tune's); they raise, as Ray's do.
    def get_metadata(self):
        raise _removed("get_metadata")

    def get_trial_name(self):
        raise _removed("get_trial_name")

    def get_trial_id(self):
        raise _removed("get_trial_id")

    def get_trial_resources(self):
        raise _removed("get_trial_resources")

    def get_trial_dir(self):
        raise _removed("get_trial_dir")


def _removed(name: str):
    from trainkit.errors import DeprecatedSettingError

    return DeprecatedSettingError(f"TrainContext.{name}()", "a Ray Tune API that Ray Train V2 removed (Ray 2.60 "
                                  "raises DeprecationWarning too); use get_experiment_name() / get_storage()")


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
           checkpoint_upload_mode: CheckpointUploadMode = CheckpointUploadMode.SYNC,
           delete_local_checkpoint_after_upload: Optional[bool] = None,
           checkpoint_upload_fn: Optional[Callable[[Checkpoint, str], Checkpoint]] = None,
           validation: Union[bool, ValidationTaskConfig] = False) -> None:
    """Report metrics (and optionally a checkpoint) for this step. A barrier across ranks.

    With ``SYNC`` (default) it returns on every rank once all ranks reported this index and
    the checkpoint is committed. With ``ASYNC`` it returns at once: the checkpoint is copied
    and the report committed in the background, and the report is acknowledged (durable)
    when this rank's next ``report()``, collective or ``get_all_reported_checkpoints()``
    returns, or its training function returns. ``NO_UPLOAD``: the checkpoint is already a
    folder of the run folder. Metrics come from rank 0; checkpoint files from all ranks that
    pass one are merged into one folder. ``validation=True`` (or a ``ValidationTaskConfig``)
    runs the trainer's ``ValidationConfig.fn`` on the committed checkpoint in the background.

    >>> trainkit.report({"loss": loss.item()}, checkpoint=Checkpoint.from_directory(d))  # doctest: +SKIP
    """
    current_session("report").report(metrics, checkpoint, checkpoint_dir_name, checkpoint_upload_mode,
                                      delete_local_checkpoint_after_upload, checkpoint_upload_fn, validation)


def get_checkpoint() -> Optional[Checkpoint]:
    """The checkpoint to resume from: the latest committed one (None at the start of a fresh run).

    An ASYNC report's checkpoint replaces it once that report is committed."""
    return current_session("get_checkpoint").checkpoint


def get_all_reported_checkpoints(consistency_mode: CheckpointConsistencyMode = CheckpointConsistencyMode.VALIDATED,
                                 timeout_s: Optional[float] = None) -> list[ReportedCheckpoint]:
    """The run's retained checkpoints with their metrics and status, oldest first.

    Waits until this rank's reports are committed (ASYNC ones included) and, with
    ``consistency_mode=VALIDATED`` (default, as Ray's), until no validation is pending, or
    ``timeout_s`` passed (then returns what there is).
    """
    s = current_session("get_all_reported_checkpoints")
    mode = consistency_mode
    if not isinstance(mode, CheckpointConsistencyMode):
        mode = next((m for m in CheckpointConsistencyMode if getattr(mode, "value", mode) == m.value), None)
        if mode is None:
            raise ConfigError("get_all_reported_checkpoints(consistency_mode)", consistency_mode,
                              "CheckpointConsistencyMode.COMMITTED or .VALIDATED")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or timeout_s < 0):
        raise ConfigError("get_all_reported_checkpoints(timeout_s)", timeout_s, "None or a number of seconds >= 0")
    listing = s.reported_checkpoints(mode, timeout_s) if isinstance(s, Session) else \
        s.coordinator.reported_checkpoints()
    out = []
    for entry in listing:
        d, m = entry[0], entry[1]
        status = ReportedCheckpointStatus(entry[2]) if len(entry) > 2 and entry[2] else \
            ReportedCheckpointStatus.COMMITTED
        out.append(ReportedCheckpoint(Checkpoint(s.store.path(d), s.store.fs), m, status))
    return out


def get_preemption_info() -> Optional[PreemptionInfo]:
    """Rank 0's view of an imminent preemption (a collective: every rank must call it, as in Ray), or
    None. Which nodes' ranks were told to stop soon (SIGTERM, a drained node) and the earliest
    deadline; save a checkpoint when it is not None.

    >>> if trainkit.get_preemption_info() is not None: trainkit.report(m, checkpoint=c)  # doctest: +SKIP
    """
    s = current_session("get_preemption_info")
    forward = getattr(s, "get_preemption_info", None)
    if forward is not None:  # a backend's forwarding session (ray_train: Ray Train's own)
        return forward()
    local = s.context.is_preempted()
    info = s.collective("preemption_info", _local_preemption_info(s) if local else None)
    if isinstance(info, dict):  # the ray controller's answer: every noticed rank of the group
        info = PreemptionInfo(info.get("deadline_ms"), {k: list(v) for k, v in info["nodes"].items()}) \
            if info.get("nodes") else None
    return info


def _local_preemption_info(s) -> PreemptionInfo:
    """This rank's own notice (its deadline is known where the notice was recorded: the controller)."""
    return PreemptionInfo(None, {s.info.node_id or "local": [s.info.world_rank]})


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
           "get_preemption_info", "TrainContext", "ReportedCheckpoint", "ReportedCheckpointStatus", "PreemptionInfo",
           "RankInfo", "ReportReply", "Coordinator"]
