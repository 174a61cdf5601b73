"""Backend ``ray_train``: the same training function on real Ray Train 2.60.

The driver side (``RayTrainBackend.run``) translates the trainkit configs into
``ray.train`` ones, runs ``ray.train.torch.TorchTrainer`` and converts its ``Result``
(or its ``TrainingFailedError``) into trainkit's. Inside each Ray Train worker,
``_ray_train_loop`` installs a forwarding session, so ``trainkit.report``,
``get_checkpoint``, ``get_context``, ``get_dataset_shard``, ``get_all_reported_checkpoints``
and ``trainkit.collective`` call ``ray.train`` (worker-side fault hooks still fire around
each forwarded ``report``). ``num_workers=0`` runs Ray Train's own local mode.

What Ray Train does differently is Ray Train's behaviour, not hidden: Result.metrics
ignores metrics-only reports, a mismatched report count hangs, local mode does not
persist, and so on (docs/semantics.md, the conformance suite's xfails).

Additions of the adapter: ``get_context().get_attempt()`` (Ray Train has no attempt
number; counted per rank in ``<run>/.trainkit_attempts-rank<r>``) and sequence datasets (lists,
map-style torch datasets), sharded in the worker as trainkit does, since Ray Train takes
only Ray Datasets. For speed the adapter sets ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1``
(default 2 s bounds every report to one controller poll) unless the caller set it.
Runs in the driver and, for ``_ray_train_loop``, in Ray Train's worker processes.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

from trainkit import backends
from trainkit.checkpoint import Checkpoint
from trainkit.config import PROCESS_GROUP_TIMEOUT_S
from trainkit.errors import ControllerError, TrainingFailedError, WorkerFailure, WorkerGroupError

# Ray Train knobs set for the duration of a fit unless already in the environment (propagated to its actors).
_FAST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def _is_ray_dataset(ds: Any) -> bool:
    return hasattr(ds, "streaming_split") and hasattr(ds, "iter_batches")


class RayTrainBackend:
    """Runs trainkit training functions on ``ray.train.torch.TorchTrainer``.

    >>> TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=2), backend="ray_train").fit()  # doctest: +SKIP
    """

    name = "ray_train"
    capabilities = frozenset({backends.MULTI_WORKER, backends.FAULT_INJECTION, backends.ELASTIC})
    handles_local_mode = True  # num_workers=0 is Ray Train's local mode, not trainkit's
    needs_ray = True

    @property
    def version(self) -> str:
        import ray

        return f"ray {ray.__version__} (Ray Train V2)"

    def run(self, spec: backends.TrainSpec):
        from trainkit.extras import require

        require("ray-train", "the ray_train backend")
        import ray.train
        import ray.train.torch

        from trainkit._serialize import dumps_train_fn
        from trainkit.backends import _ray_train_callbacks

        rc = spec.run_config
        sc = spec.scaling_config
        ray_datasets = {k: v for k, v in spec.datasets.items() if _is_ray_dataset(v)}
        seq_datasets = {k: v for k, v in spec.datasets.items() if not _is_ray_dataset(v)}
        cfg = {"fn": dumps_train_fn(spec.train_fn), "takes_config": spec.takes_config,
               "config": spec.train_loop_config, "datasets": seq_datasets, "storage_path": rc.storage_path,
               "name": rc.name, "local_mode": sc.local_mode,
               "hooks": [cb.worker_hook() for cb in rc.callbacks if hasattr(cb, "worker_hook")]}
        ck = rc.checkpoint_config
        storage_path, storage_fs = ray_storage(rc.storage_path)
        ray_rc = ray.train.RunConfig(
            name=rc.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=rc.failure_config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ck.num_to_keep,
                                                         checkpoint_score_attribute=ck.checkpoint_score_attribute,
                                                         checkpoint_score_order=ck.checkpoint_score_order),
            worker_runtime_env=rc.worker_runtime_env, callbacks=_ray_train_callbacks.forwarded(rc.callbacks, convert_checkpoint, _failure))
        ray_sc = ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                         resources_per_worker=sc.resources_per_worker,
                                         placement_strategy=sc.placement_strategy)
        tc = spec.torch_config
        torch_config = ray.train.torch.TorchConfig(backend=getattr(tc, "backend", None),
                                                   timeout_s=getattr(tc, "timeout_s", PROCESS_GROUP_TIMEOUT_S))
        trainer = ray.train.torch.TorchTrainer(_ray_train_loop, train_loop_config=cfg, scaling_config=ray_sc,
                                               run_config=ray_rc, torch_config=torch_config,
                                               datasets=ray_datasets or None)
        saved = {k: os.environ.get(k) for k in _FAST_ENV}
        for k, v in _FAST_ENV.items():
            os.environ.setdefault(k, v)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise convert_error(e) from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
        return convert_result(result)


    def result_from_path(self, path: str):
        """``ray.train.Result.from_path`` of a run folder Ray Train wrote (its
        ``checkpoint_manager_snapshot.json``), as a trainkit ``Result`` (Ray's ``error`` is always None)."""
        import ray.train

        storage_path, fs = ray_storage(path)
        return convert_result(ray.train.Result.from_path(storage_path, storage_filesystem=fs))


def ray_storage(path: str):
    """(storage_path, pyarrow filesystem or None) for Ray Train: an ``s3://`` path goes with a pyarrow
    ``S3FileSystem`` on ``$AWS_ENDPOINT_URL`` when that is set (moto, MinIO), since Ray Train resolves
    ``s3://`` through pyarrow, which would otherwise ask AWS itself."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not path.startswith("s3://") or not endpoint:
        return path, None
    import pyarrow.fs

    scheme, _, rest = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=rest or endpoint, scheme=scheme if rest else "https",
                                 access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                                 secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                                 session_token=os.environ.get("AWS_SESSION_TOKEN"),
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return path[len("s3://"):], fs


# -- conversions (driver) -------------------------------------------------------------------------
def convert_checkpoint(ckpt) -> Optional[Checkpoint]:
    """A ``ray.train.Checkpoint`` (pyarrow filesystem) as a trainkit ``Checkpoint`` (fsspec)."""
    if ckpt is None:
        return None
    fs = getattr(ckpt, "filesystem", None)
    kind = type(fs).__name__ if fs is not None else "LocalFileSystem"
    if kind == "S3FileSystem":
        return Checkpoint(f"s3://{ckpt.path}")
    if kind == "GcsFileSystem":
        return Checkpoint(f"gs://{ckpt.path}")
    return Checkpoint(ckpt.path)


def convert_result(r):
    from trainkit.result import Result

    history = []
    df = getattr(r, "metrics_dataframe", None)
    if df is not None:
        history = df.to_dict("records")
    best = [(convert_checkpoint(c), dict(m)) for c, m in (r.best_checkpoints or [])]
    return Result(metrics=r.metrics, checkpoint=convert_checkpoint(r.checkpoint), path=r.path, error=None,
                  best_checkpoints=best, history=history, return_value=getattr(r, "return_value", None))


def _failure(rank: int, exc: BaseException) -> WorkerFailure:
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    died = type(exc).__name__ in ("WorkerHealthCheckFailedError", "ActorDiedError", "RayActorError")
    return WorkerFailure(world_rank=int(rank), kind="died" if died else "exception", exc_type=type(exc).__name__,
                         message=str(exc)[:4000], traceback=tb[-8000:])


def convert_error(e: BaseException) -> TrainingFailedError:
    """Ray Train's ``TrainingFailedError`` as trainkit's (same kind, per-rank failures, Ray's message)."""
    worker_failures = getattr(e, "worker_failures", None)
    if worker_failures is not None:
        return WorkerGroupError(f"(Ray Train) {e}", [_failure(r, x) for r, x in sorted(worker_failures.items())])
    cause = getattr(e, "controller_failure", None)
    if cause is not None:
        return ControllerError(f"(Ray Train) {e}", [_failure(-1, cause)])
    return TrainingFailedError(f"(Ray Train) {e}")


# -- the worker side ------------------------------------------------------------------------------
class _Forwarder:
    """Stands in for trainkit's per-rank session inside a Ray Train worker; forwards to ``ray.train``."""

    def __init__(self, cfg: dict):
        import ray.train

        from trainkit.session import RankInfo, TrainContext
        from trainkit.storage import RunStore

        ctx = ray.train.get_context()
        self.store = RunStore(cfg["storage_path"], cfg["name"])
        self.experiment_name = cfg["name"]
        rank = ctx.get_world_rank()
        node_id = ""
        try:
            import ray as _ray

            if _ray.is_initialized():
                node_id = _ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - informational only
            pass
        attempt = 1 if cfg["local_mode"] else _count_attempt(self.store, rank)
        self.info = RankInfo(world_rank=rank, world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank(),
                             local_world_size=ctx.get_local_world_size(), node_rank=ctx.get_node_rank(),
                             node_id=node_id, attempt=attempt)
        self.index = 0
        self.datasets = cfg["datasets"]
        self.hooks = list(cfg.get("hooks") or [])
        self.preempted = threading.Event()  # Ray Train has no SIGTERM notice (it polls node drains)
        self._shards: dict = {}
        self.coordinator = self
        self.context = TrainContext(self)

    @property
    def checkpoint(self) -> Optional[Checkpoint]:
        import ray.train

        return convert_checkpoint(ray.train.get_checkpoint())

    def report(self, metrics: dict, checkpoint: Optional[Checkpoint] = None,
               checkpoint_dir_name: Optional[str] = None, checkpoint_upload_mode: Any = None,
               delete_local_checkpoint_after_upload: Optional[bool] = None, checkpoint_upload_fn: Any = None,
               validation: Any = False) -> None:
        import ray.train

        options: dict = {}  # trainkit's report options, as Ray Train's (passed on only when given)
        if checkpoint_upload_mode is not None:
            options["checkpoint_upload_mode"] = ray.train.CheckpointUploadMode(
                getattr(checkpoint_upload_mode, "value", checkpoint_upload_mode))
        if delete_local_checkpoint_after_upload is not None:
            options["delete_local_checkpoint_after_upload"] = delete_local_checkpoint_after_upload
        if checkpoint_upload_fn is not None:
            options["checkpoint_upload_fn"] = lambda ckpt, name: ray.train.Checkpoint(
                checkpoint_upload_fn(convert_checkpoint(ckpt), name).path)
        if validation is not False:
            from trainkit.config import ValidationTaskConfig

            options["validation"] = (ray.train.ValidationTaskConfig(validation.fn_kwargs, validation.timeout_s)
                                     if isinstance(validation, ValidationTaskConfig) else validation)

        index = self.index + 1
        for h in self.hooks:
            if hasattr(h, "before_report"):
                h.before_report(self.context, index, metrics)
        ray_ckpt = None
        if checkpoint is not None:
            from trainkit.storage import is_local

            path = checkpoint.path if is_local(checkpoint.filesystem) else checkpoint.to_directory()
            ray_ckpt = ray.train.Checkpoint.from_directory(path)
        ray.train.report(metrics, checkpoint=ray_ckpt, checkpoint_dir_name=checkpoint_dir_name, **options)
        self.index = index
        for h in self.hooks:
            if hasattr(h, "after_report"):
                h.after_report(self.context, index, metrics)

    def get_preemption_info(self):
        import ray.train

        from trainkit.errors import PreemptionInfo

        info = ray.train.get_preemption_info()
        return None if info is None else PreemptionInfo(info.deadline_ms, dict(info.preempted_node_to_ranks))

    def collective(self, op: str, payload: Any = None) -> Any:
        import ray.train.collective  # not imported by `import ray.train` (reference §1.3)

        if op == "barrier":
            return ray.train.collective.barrier()
        if op == "broadcast":
            return ray.train.collective.broadcast_from_rank_zero(payload)
        raise ValueError(f"unknown collective {op!r}")

    def get_dataset_shard(self, name: Optional[str], state_dict: Any = None):
        import ray.train

        if name in self.datasets:
            if name not in self._shards or state_dict is not None:
                from trainkit.session import rank_shard

                self._shards[name] = rank_shard(self, name, state_dict)
            return self._shards[name]
        if state_dict is not None:
            from trainkit.errors import ConfigError

            raise ConfigError("get_dataset_shard(state_dict)", "a saved state",
                              "None on the ray_train backend for Ray Datasets: Ray Train 2.60 keeps no dataset "
                              "iterator state (a restart begins the epoch again)")
        return ray.train.get_dataset_shard(name)

    def reported_checkpoints(self) -> list:
        import ray.train

        out = []
        for rc in ray.train.get_all_reported_checkpoints():
            out.append((os.path.basename(rc.checkpoint.path.rstrip("/")), dict(rc.metrics)))
        return out


def _count_attempt(store, rank: int) -> int:
    """This rank's start count in this run folder (Ray Train restarts every rank of the group together)."""
    rel = f".trainkit_attempts-rank{rank}"
    if store.local:
        os.makedirs(store.run_path, exist_ok=True)
    data = store.read_bytes(rel) or b""
    data += b"x\n"
    store.write_bytes_atomic(rel, data)
    return data.count(b"\n")


def _ray_train_loop(cfg: dict):
    """The function Ray Train runs on every worker: install the forwarder, run the user's function."""
    from trainkit._serialize import loads_train_fn
    from trainkit.session import set_session

    fn = loads_train_fn(cfg["fn"])
    set_session(_Forwarder(cfg))
    try:
        config = cfg["config"] if cfg["config"] is not None else {}
        return fn(config) if cfg["takes_config"] else fn()
    finally:
        set_session(None)
