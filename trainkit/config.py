"""Run configuration: frozen dataclasses validated at construction.

A bad value raises ``ConfigError`` (also a ``ValueError``) naming the field, the value
and what is allowed, before any worker starts. Defaults that come from the
environment (``TRAINKIT_STORAGE_PATH``, ``TRAINKIT_HANG_TIMEOUT_S``) are resolved here.
Runs in the driver (and is pickled to workers).
"""

from __future__ import annotations

import enum
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple, Union

from trainkit import _env
from trainkit.errors import ConfigError, DeprecatedSettingError

_PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_STORAGE_SCHEMES = ("", "file", "local", "s3", "memory", "gs", "gcs")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ScalingConfig:
    """How many workers, with which resources.

    ``num_workers=0`` runs the function in this process (local mode); an int runs that
    many ranks; a ``(min, max)`` tuple is elastic.

    >>> ScalingConfig(num_workers=(2, 4)).max_workers
    4
    """

    num_workers: Union[int, Tuple[int, int]] = 1
    use_gpu: bool = False
    resources_per_worker: Optional[dict] = None
    placement_strategy: str = "PACK"
    trainer_resources: Optional[dict] = None
    accelerator_type: Optional[str] = None
    label_selector: Any = None
    use_tpu: bool = False
    topology: Optional[str] = None
    elastic_resize_monitor_interval_s: float = 60.0

    def __post_init__(self):
        if self.use_tpu:
            raise ConfigError("ScalingConfig.use_tpu", self.use_tpu, "False (trainkit runs on CPUs and GPUs only)")
        if self.topology is not None:
            raise ConfigError("ScalingConfig.topology", self.topology, "None (a TPU setting; trainkit has no TPUs)")
        if self.accelerator_type is not None and not isinstance(self.accelerator_type, str):
            raise ConfigError("ScalingConfig.accelerator_type", self.accelerator_type, "None or an accelerator name")
        v = self.elastic_resize_monitor_interval_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError("ScalingConfig.elastic_resize_monitor_interval_s", v, "a number of seconds >= 0")
        n = self.num_workers
        if isinstance(n, list):
            n = tuple(n)
            object.__setattr__(self, "num_workers", n)
        if isinstance(n, tuple):
            if len(n) != 2 or not all(_is_int(x) for x in n):
                raise ConfigError("ScalingConfig.num_workers", n, "an int or a (min, max) tuple of two ints")
            lo, hi = n
            if lo < 1:
                raise ConfigError("ScalingConfig.num_workers", n, "an elastic (min, max) with min >= 1")
            if lo > hi:
                raise ConfigError("ScalingConfig.num_workers", n, "an elastic (min, max) with min <= max")
        elif not _is_int(n):
            raise ConfigError("ScalingConfig.num_workers", n, "an int or a (min, max) tuple of two ints")
        elif n < 0:
            raise ConfigError("ScalingConfig.num_workers", n,
                              "an int >= 0 (0 runs in this process, local mode) or a (min, max) tuple")
        if not isinstance(self.use_gpu, bool):
            raise ConfigError("ScalingConfig.use_gpu", self.use_gpu, "True or False")
        if self.placement_strategy not in _PLACEMENT_STRATEGIES:
            raise ConfigError("ScalingConfig.placement_strategy", self.placement_strategy,
                              "one of " + ", ".join(_PLACEMENT_STRATEGIES))
        for fname in ("resources_per_worker", "trainer_resources"):
            res = getattr(self, fname)
            if res is None:
                continue
            if not isinstance(res, dict):
                raise ConfigError(f"ScalingConfig.{fname}", res, "a dict of resource name -> amount")
            for k, v in res.items():
                if not isinstance(k, str) or not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    raise ConfigError(f"ScalingConfig.{fname}[{k!r}]", v, "a number >= 0")
        res = self.resources_per_worker or {}
        if res.get("GPU", 0) > 0 and not self.use_gpu:
            raise ConfigError("ScalingConfig.resources_per_worker", self.resources_per_worker,
                              "no GPU unless use_gpu=True", hint="set use_gpu=True")
        ls = self.label_selector
        if ls is not None:
            if isinstance(ls, list):
                if len(ls) != self.max_workers or not all(isinstance(x, dict) for x in ls):
                    raise ConfigError("ScalingConfig.label_selector", ls,
                                      f"a dict, or a list of {self.max_workers} dicts (one per worker)")
            elif not isinstance(ls, dict):
                raise ConfigError("ScalingConfig.label_selector", ls, "None, a dict or a list of dicts")

    @property
    def local_mode(self) -> bool:
        return self.num_workers == 0

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def worker_resources(self) -> dict:
        """The resources of one worker's bundle: default one CPU, or one GPU with ``use_gpu``."""
        res = {k: v for k, v in (self.resources_per_worker or {}).items() if v}
        if self.use_gpu:
            res.setdefault("GPU", 1)
        if not res:
            res = {"CPU": 1}
        if self.accelerator_type:
            res[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return res


@dataclass(frozen=True)
class FailureConfig:
    """How many times a failed group is restarted from the latest checkpoint.

    ``max_failures=-1`` retries forever. Preemptions (SIGTERM with notice, a drained
    node) are counted apart, against ``max_preemptions`` (-1 by default: they never use
    up ``max_failures``).
    """

    max_failures: int = 0
    max_preemptions: int = -1
    fail_fast: Any = None
    controller_failure_limit: int = -1
    max_preemption_failures: Optional[int] = None  # Ray's name for max_preemptions
    relax_collectives_on_preemption: bool = False
    preemption_grace_s: float = 0.0

    def __post_init__(self):
        if self.fail_fast is not None:
            raise DeprecatedSettingError("FailureConfig.fail_fast", "removed in Ray Train V2")
        if self.max_preemption_failures is not None:
            if self.max_preemptions not in (-1, self.max_preemption_failures):
                raise ConfigError("FailureConfig.max_preemption_failures", self.max_preemption_failures,
                                  f"the same as max_preemptions={self.max_preemptions} (they are one setting)")
            object.__setattr__(self, "max_preemptions", self.max_preemption_failures)
        object.__setattr__(self, "max_preemption_failures", self.max_preemptions)
        if not isinstance(self.relax_collectives_on_preemption, bool):
            raise ConfigError("FailureConfig.relax_collectives_on_preemption", self.relax_collectives_on_preemption,
                              "True or False")
        g = self.preemption_grace_s
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0 or math.isinf(g):
            raise ConfigError("FailureConfig.preemption_grace_s", g, "a number of seconds >= 0")
        for fname in ("max_failures", "max_preemptions", "controller_failure_limit"):
            v = getattr(self, fname)
            if not _is_int(v) or v < -1:
                raise ConfigError(f"FailureConfig.{fname}", v, "an int >= 0, or -1 for unlimited")


@dataclass(frozen=True)
class CheckpointConfig:
    """Which checkpoints to keep (Ray Train's semantics).

    A missing or NaN score always ranks worst, whatever the order.
    """

    num_to_keep: Optional[int] = None
    checkpoint_score_attribute: Optional[str] = None
    checkpoint_score_order: str = "max"
    checkpoint_frequency: Any = None
    checkpoint_at_end: Any = None

    def __post_init__(self):
        for fname in ("checkpoint_frequency", "checkpoint_at_end"):
            if getattr(self, fname) is not None:
                raise DeprecatedSettingError(f"CheckpointConfig.{fname}",
                                             "removed in Ray Train V2: report a checkpoint from the training "
                                             "function when you want one")
        if self.num_to_keep is not None and (not _is_int(self.num_to_keep) or self.num_to_keep < 1):
            raise ConfigError("CheckpointConfig.num_to_keep", self.num_to_keep, "None or an int >= 1")
        if self.checkpoint_score_order not in ("min", "max"):
            raise ConfigError("CheckpointConfig.checkpoint_score_order", self.checkpoint_score_order,
                              "'min' or 'max'")
        if self.checkpoint_score_attribute is not None and not isinstance(self.checkpoint_score_attribute, str):
            raise ConfigError("CheckpointConfig.checkpoint_score_attribute",
                              self.checkpoint_score_attribute, "None or a metric name")


_HANG_ACTIONS = ("warn", "fail", "restart")
_HANG_DUMPS = ("auto", "py-spy", "faulthandler")


@dataclass(frozen=True)
class HangConfig:
    """What to do when ranks wait at a report barrier for longer than ``timeout_s``.

    ``timeout_s=None`` takes ``TRAINKIT_HANG_TIMEOUT_S`` (unset: no hang detection).
    """

    timeout_s: Optional[float] = None
    action: str = "warn"
    dump: str = "auto"

    def __post_init__(self):
        t = self.timeout_s
        if t is None:
            t = _env.HANG_TIMEOUT_S.get_float()
            object.__setattr__(self, "timeout_s", t)
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0
                              or math.isinf(t)):
            raise ConfigError("HangConfig.timeout_s", t, "a number of seconds > 0, or None for no detection")
        if self.action not in _HANG_ACTIONS:
            raise ConfigError("HangConfig.action", self.action, "one of " + ", ".join(_HANG_ACTIONS))
        if self.dump not in _HANG_DUMPS:
            raise ConfigError("HangConfig.dump", self.dump, "one of " + ", ".join(_HANG_DUMPS))


@dataclass(frozen=True)
class StragglerConfig:
    """When a rank is named a straggler (``straggler_detected``; trainkit.diagnostics.stragglers).

    A rank whose step time (previous report's release to its arrival at this report) is
    more than ``factor`` times the median of the other ranks' and at least ``min_slower_s``
    longer, at ``reports`` consecutive reports, is named once, with about ``sample_s``
    seconds of py-spy samples and a classification. ``enabled=False`` turns it off.

    >>> StragglerConfig(factor=3.0).reports
    3
    """

    factor: float = 2.0
    min_slower_s: float = 0.2
    reports: int = 3
    sample_s: float = 1.0
    enabled: bool = True

    def __post_init__(self):
        for name, low in (("factor", 1.0), ("min_slower_s", 0.0), ("sample_s", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                raise ConfigError(f"StragglerConfig.{name}", v, f"a finite number >= {low:g}")
        if isinstance(self.reports, bool) or not isinstance(self.reports, int) or self.reports < 1:
            raise ConfigError("StragglerConfig.reports", self.reports, "an int >= 1")
        if not isinstance(self.enabled, bool):
            raise ConfigError("StragglerConfig.enabled", self.enabled, "True or False")


def default_run_name() -> str:
    """A name unique per run: time to the second plus random hex (no collisions in one second)."""
    return time.strftime("trainkit_run-%Y-%m-%d_%H-%M-%S-") + secrets.token_hex(3)


_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def _validate_storage_path(path: str) -> str:
    """The storage path to use, or ``ConfigError`` before anything is created: an unknown scheme, an
    object store URI without a bucket, a relative local path or ``file://`` URI."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        scheme = scheme.lower()
        if scheme not in _STORAGE_SCHEMES:
            raise ConfigError("RunConfig.storage_path", path,
                              "a local absolute path or a URI with scheme " +
                              ", ".join(s + "://" for s in _STORAGE_SCHEMES if s))
        if scheme in ("file", "local"):
            if not rest.startswith("/"):
                raise ConfigError("RunConfig.storage_path", path, f"an absolute {scheme}:// URI ({scheme}:///abs/dir)",
                                  hint=f"use {scheme}://{os.path.abspath(os.path.expanduser(rest))}")
            return rest
        if scheme in _BUCKET_SCHEMES and not rest.split("/", 1)[0]:
            raise ConfigError("RunConfig.storage_path", path, f"a URI naming a bucket: {scheme}://<bucket>/<prefix>")
        return path
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        raise ConfigError("RunConfig.storage_path", path,
                          "an absolute path (or s3://, memory://)",
                          hint=f"use {os.path.abspath(expanded)!r}")
    return expanded


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run is stored, retried and watched.

    ``name`` defaults to a unique ``trainkit_run-...``; ``storage_path`` defaults to
    ``$TRAINKIT_STORAGE_PATH`` or ``~/trainkit_results``. A second ``fit()`` with the
    same ``name`` and ``storage_path`` resumes from the run's latest checkpoint.
    """

    name: Optional[str] = None
    storage_path: Optional[str] = None
    storage_filesystem: Any = None
    failure_config: Optional[FailureConfig] = None
    checkpoint_config: Optional[CheckpointConfig] = None
    hang_config: Optional[HangConfig] = None
    callbacks: Optional[Sequence[Any]] = None
    worker_runtime_env: Optional[dict] = None
    verbose: Optional[int] = None
    straggler_config: Optional[StragglerConfig] = None  # trainkit: stragglers named in the event stream
    spare_workers: int = 0  # trainkit: pre-started workers kept per run to replace a dead rank (issue 17)
    logging_config: Optional["LoggingConfig"] = None
    # Ray Train V2 removed these (Ray Tune settings): any value raises, naming the setting, as Ray does.
    sync_config: Any = None
    stop: Any = None
    progress_reporter: Any = None
    log_to_file: Any = None

    def __post_init__(self):
        for fname in ("sync_config", "verbose", "stop", "progress_reporter", "log_to_file"):
            if getattr(self, fname) is not None:
                raise DeprecatedSettingError(
                    f"RunConfig.{fname}", "a Ray Tune setting that Ray Train V2 removed (Ray 2.60 raises too); "
                    "run the trainer inside a Ray Tune trial if you need it")
        if isinstance(self.spare_workers, bool) or not isinstance(self.spare_workers, int) or self.spare_workers < 0:
            raise ConfigError("RunConfig.spare_workers", self.spare_workers, "an int >= 0 (0: no hot spares)")
        name = default_run_name() if self.name is None else self.name
        if not isinstance(name, str):
            raise ConfigError("RunConfig.name", self.name, "a string")
        if not name.strip():
            raise ConfigError("RunConfig.name", name, "a non-empty folder name, or None for a new "
                              "trainkit_run-<time>-<hex> name per run")
        if "/" in name or "\\" in name or os.sep in name or name in (".", ".."):
            raise ConfigError("RunConfig.name", name, "a name without path separators",
                              hint="put the folder in storage_path")
        object.__setattr__(self, "name", name)
        sp = self.storage_path
        if sp is None:
            sp = _env.STORAGE_PATH.get()
        sp = os.fspath(sp)
        if self.storage_filesystem is None:
            sp = _validate_storage_path(sp)
        object.__setattr__(self, "storage_path", sp)
        for fname, cls in (("failure_config", FailureConfig), ("checkpoint_config", CheckpointConfig),
                           ("hang_config", HangConfig), ("straggler_config", StragglerConfig)):
            v = getattr(self, fname)
            if v is None:
                object.__setattr__(self, fname, cls())
            elif not isinstance(v, cls):
                raise ConfigError(f"RunConfig.{fname}", v, f"a trainkit.{cls.__name__}")
        # None: trainkit's logger is left as the application set it up (Ray's default is LoggingConfig("INFO"))
        if self.logging_config is not None and not isinstance(self.logging_config, LoggingConfig):
            raise ConfigError("RunConfig.logging_config", self.logging_config, "None or a trainkit.LoggingConfig")
        cbs = list(self.callbacks or [])
        for cb in cbs:
            if isinstance(cb, type):
                raise ConfigError("RunConfig.callbacks", cb, "callback instances, not classes")
        object.__setattr__(self, "callbacks", tuple(cbs))


@dataclass(frozen=True)
class LoggingConfig:
    """The level of trainkit's own logs (the ``trainkit`` logger), as Ray's ``ray.train.LoggingConfig``.

    Applied in the driver, in the process that coordinates the run and in every rank. The
    level is upper-cased; an unknown one raises ``ConfigError``.

    >>> LoggingConfig("debug").log_level
    'DEBUG'
    """

    log_level: str = "INFO"

    def __post_init__(self):
        levels = sorted(k for k in logging.getLevelNamesMapping())
        if not isinstance(self.log_level, str) or self.log_level.upper() not in levels:
            raise ConfigError("LoggingConfig.log_level", self.log_level, "one of " + ", ".join(levels))
        object.__setattr__(self, "log_level", self.log_level.upper())

    def apply(self) -> None:
        """Set the ``trainkit`` logger's level in this process."""
        logging.getLogger("trainkit").setLevel(self.log_level)


@dataclass(frozen=True)
class SyncConfig:
    """Ray's ``ray.train.SyncConfig`` (same parameters). Ray Train V2 rejects it in ``RunConfig`` (a
    Ray Tune setting), and so does trainkit; it exists so that code importing it keeps importing."""

    sync_period: int = 300
    sync_timeout: int = 1800
    sync_artifacts: bool = False
    sync_artifacts_on_checkpoint: bool = True


@dataclass(frozen=True)
class BackendConfig:
    """Base of the per-framework settings a trainer passes to its workers (``TorchConfig``).

    ``DataParallelTrainer(backend_config=BackendConfig())`` sets up no framework, as in Ray.
    """

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


class CheckpointUploadMode(enum.Enum):
    """How ``report(checkpoint=...)`` stores the checkpoint (Ray's ``ray.train.CheckpointUploadMode``).

    ``SYNC``: copied into the run folder before ``report()`` returns. ``ASYNC``: ``report()``
    returns at once and the copy and commit go on in the background (the local folder is deleted
    afterwards by default). ``NO_UPLOAD``: the checkpoint is already in the run folder.
    """

    ASYNC = "ASYNC"
    SYNC = "SYNC"
    NO_UPLOAD = "NO_UPLOAD"

    def default_delete_local_checkpoint_after_upload(self) -> bool:
        return self == CheckpointUploadMode.ASYNC


class CheckpointConsistencyMode(enum.Enum):
    """What ``get_all_reported_checkpoints`` waits for (Ray's ``ray.train.CheckpointConsistencyMode``).

    ``COMMITTED``: this rank's reports are committed (ASYNC uploads included). ``VALIDATED``: also
    no validation of them is still running.
    """

    COMMITTED = "COMMITTED"
    VALIDATED = "VALIDATED"


class ValidationFn(Protocol):
    """A function that validates a checkpoint: ``fn(checkpoint, **kwargs) -> dict`` of metrics."""

    def __call__(self, checkpoint: Any, **kwargs: Any) -> Dict: ...


@dataclass
class ValidationTaskConfig:
    """One validation's settings, passed as ``report(..., validation=ValidationTaskConfig(...))``.

    ``fn_kwargs`` update the trainer's ``ValidationConfig.task_config.fn_kwargs``; ``timeout_s``
    (None: none) bounds how long the validation may run before it is marked ``VALIDATION_TIMEOUT``.
    """

    fn_kwargs: Optional[Dict[str, Any]] = None
    timeout_s: Optional[float] = None

    def __post_init__(self):
        if self.fn_kwargs is None:
            self.fn_kwargs = {}
        if not isinstance(self.fn_kwargs, dict):
            raise ConfigError("ValidationTaskConfig.fn_kwargs", self.fn_kwargs, "a dict of keyword arguments")
        t = self.timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ConfigError("ValidationTaskConfig.timeout_s", t, "None or a number of seconds > 0")


class ValidationConfig:
    """Validation of reported checkpoints (Ray's ``ray.train.ValidationConfig``), passed to the trainer.

    ``fn(checkpoint, **fn_kwargs)`` runs on each committed checkpoint reported with
    ``validation=True`` (or a ``ValidationTaskConfig``), one at a time, in a background thread
    of world rank 0, while training goes on; the dict it returns is merged into that checkpoint's
    metrics. ``ray_remote_kwargs`` is accepted for Ray compatibility (trainkit runs no Ray task).

    >>> cfg = ValidationConfig(lambda ckpt, **kw: {"val_loss": 0.1})
    >>> cfg.task_config.fn_kwargs
    {}
    """

    def __init__(self, fn: ValidationFn, task_config: Optional[ValidationTaskConfig] = None,
                 ray_remote_kwargs: Optional[Dict[str, Any]] = None):
        if not callable(fn):
            raise ConfigError("ValidationConfig.fn", fn, "a function fn(checkpoint, **kwargs) -> dict")
        if task_config is not None and not isinstance(task_config, ValidationTaskConfig):
            raise ConfigError("ValidationConfig.task_config", task_config, "a trainkit.ValidationTaskConfig or None")
        if ray_remote_kwargs is not None and not isinstance(ray_remote_kwargs, dict):
            raise ConfigError("ValidationConfig.ray_remote_kwargs", ray_remote_kwargs, "a dict or None")
        self.fn = fn
        self.task_config = task_config if task_config is not None else ValidationTaskConfig()
        self.ray_remote_kwargs = dict(ray_remote_kwargs or {})


TRAIN_DATASET_KEY = "train"  # the dataset name Ray's framework integrations read (ray.train.TRAIN_DATASET_KEY)


@dataclass(frozen=True)
class DataConfig:
    """Which datasets are split across ranks (Ray's ``ray.train.DataConfig``, same parameters).

    ``datasets_to_split``: ``"all"`` (default) or a list of dataset names; a dataset not named is
    given whole to every rank. ``execution_options`` is Ray Data's (``ExecutionOptions`` or a dict
    of them per dataset); ``enable_shard_locality`` as Ray's.
    """

    datasets_to_split: Any = "all"
    execution_options: Any = None
    enable_shard_locality: bool = True

    def __post_init__(self):
        d = self.datasets_to_split
        if d != "all":
            if isinstance(d, str) or not isinstance(d, (list, tuple)) or not all(isinstance(x, str) for x in d):
                raise ConfigError("DataConfig.datasets_to_split", d, '"all" or a list of dataset names')
            object.__setattr__(self, "datasets_to_split", list(d))


_BACKENDS = (None, "gloo", "nccl")


PROCESS_GROUP_TIMEOUT_S = 1800.0  # torch.distributed's timeout for a collective when no TorchConfig says otherwise


@dataclass(frozen=True)
class TorchConfig(BackendConfig):
    """torch.distributed settings: ``backend`` None picks NCCL with GPUs, else gloo.

    Re-exported as ``trainkit.torch.TorchConfig``; defined here so that the controller,
    which unpickles it, never imports torch.
    """

    backend: Optional[str] = None
    timeout_s: float = PROCESS_GROUP_TIMEOUT_S
    init_method: str = "env"

    def __post_init__(self):
        if self.backend not in _BACKENDS:
            raise ConfigError("TorchConfig.backend", self.backend, "None, 'gloo' or 'nccl'")
        if not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool) or self.timeout_s <= 0:
            raise ConfigError("TorchConfig.timeout_s", self.timeout_s, "a number of seconds > 0")
        if self.init_method not in ("env", "tcp"):
            raise ConfigError("TorchConfig.init_method", self.init_method, "'env' or 'tcp'")
