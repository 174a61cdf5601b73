"""The reference backend ``ray``: Ray core actors + torch.distributed. This module is the driver side.

``fit()`` takes the run folder's lease (one driver per run: ``trainkit.lease``; renewed here
while the run lives, released at its end, a copy that checks goes to the controller's ledger);
joins an initialised Ray, or ``RAY_ADDRESS``, or starts a local Ray; checks the storage; ships the training function (by value, so test modules need not be importable
on workers) to this driver's controller actor; shows one live progress line on a
terminal; and returns the ``Result`` or raises the run's ``TrainingFailedError``.
Ctrl-C aborts the run and kills its workers. Runs in the driver.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import uuid
from typing import Any, Optional

from trainkit import _env, backends
from trainkit._serialize import dumps_train_fn
from trainkit.lease import owned
from trainkit.storage import RunStore

_controller_lock = threading.Lock()
# (driver's node id, Ray job id) -> controller handle. The node id tells clusters apart: a new
# cluster (a new ray.init) starts its job ids again at 01000000.
_controller: dict[tuple[str, str], Any] = {}


def _driver_key() -> tuple[str, str]:
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_job_id()


_init_lock = threading.Lock()


def ensure_ray() -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray, once per process: fits from several threads
    share one ``ray.init``."""
    import ray

    with _init_lock:
        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)


def get_controller():
    """This driver's controller actor (created on first use, pinned to the driver's node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from trainkit.backends.ray.controller import ControllerActor

    job = _driver_key()
    with _controller_lock:
        handle = _controller.get(job)
        if handle is not None:
            try:
                ray.get(handle.ping.remote(), timeout=30)
                return handle
            except ray.exceptions.RayError:  # a dead (or stuck) controller: make a new one
                _controller.pop(job, None)
        node = ray.get_runtime_context().get_node_id()
        handle = ControllerActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            max_concurrency=1000).remote()
        _controller[job] = handle
        return handle


def release_warm_workers() -> None:
    """Kill the idle warm workers of this driver's controller (frees their resources)."""
    import ray

    if not ray.is_initialized():
        return
    handle = _controller.get(_driver_key())
    if handle is not None:
        try:
            ray.get(handle.shutdown.remote(), timeout=30)
        except ray.exceptions.RayError:  # the controller is gone (and its workers with it) or stuck
            pass


def _inside_ray_worker() -> bool:
    """Whether this process runs a Ray task or actor (a Tune trial), not a driver."""
    import ray

    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:  # a driver: asking it for a task id only logs a warning
        return False
    return ctx.get_task_id() is not None or ctx.get_actor_id() is not None


class _Progress:
    """One live line on a terminal: report index, latest metrics, world size, attempt; and what a
    fit waits for (other fits' resources), said once on a stream that is not a terminal."""

    def __init__(self):
        mode = _env.PROGRESS.get()
        self.on = mode == "1" or (mode == "auto" and sys.stderr.isatty())
        self.quiet = mode == "0"
        self._last = ""

    def show(self, p: Optional[dict]) -> None:
        if not p:
            return
        if p.get("status") == "waiting":
            line = f"trainkit: waiting for {p.get('waiting') or 'resources'}"
        elif self.on:
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in list((p.get("metrics") or {}).items())[:4])
            spares = f" | spares {p['spares']}/{p['spares_wanted']}" if p.get("spares_wanted") else ""
            line = (f"trainkit: report {p['index']} | world size {p['world_size']} | attempt {p['attempt']}"
                    f"{spares}{' | ' + metrics if metrics else ''}")
        else:
            return
        if line == self._last:
            return
        self._last = line
        if self.on:
            sys.stderr.write("\r\033[K" + line[:160])
        elif not self.quiet:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.on and self._last:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def worker_start_timeout_s() -> float:
    from trainkit.errors import ConfigError

    value = _env.WORKER_START_TIMEOUT_S.get_float()
    if value is None or value <= 0:
        raise ConfigError(_env.WORKER_START_TIMEOUT_S.name, _env.WORKER_START_TIMEOUT_S.get(), "seconds > 0")
    return value


def report_channel() -> str:
    from trainkit.errors import ConfigError

    value = _env.REPORT_CHANNEL.get().strip().lower()
    if value not in ("tcp", "ray"):
        raise ConfigError(_env.REPORT_CHANNEL.name, _env.REPORT_CHANNEL.get(), "tcp or ray")
    return value


class RayBackend:
    name = "ray"
    capabilities = frozenset({backends.MULTI_WORKER, backends.FAULT_INJECTION, backends.ELASTIC,
                              backends.VIRTUAL_NODES, backends.HANG_DIAGNOSTICS, backends.PREEMPTION,
                              backends.DURABLE_REPORT})
    handles_local_mode = False  # num_workers=0 is trainkit's local mode
    needs_ray = True

    def run(self, spec: backends.TrainSpec):
        from trainkit.diagnostics.debug import with_env_debugger

        spec = with_env_debugger(spec)  # TRAINKIT_DEBUG_RANK: a RankDebugger callback
        spec = dataclasses.replace(spec, worker_start_timeout_s=worker_start_timeout_s(),
                                   report_channel=report_channel())
        rc = spec.run_config
        store = RunStore(rc.storage_path, rc.name, rc.storage_filesystem)
        with owned(store, backend=self.name) as lease:  # this driver's run, or RunOwnedError at once
            store.ensure()  # fail before any worker starts
            return self._run(spec, lease)

    def _run(self, spec: backends.TrainSpec, lease):
        import ray

        fn_bytes = dumps_train_fn(spec.train_fn)
        ensure_ray()
        if spec.datasets:  # Ray Datasets execute once, here, in id order: bad ones fail before workers start
            from trainkit.data import prepare_datasets

            spec = dataclasses.replace(spec, datasets=prepare_datasets(spec.datasets, release_warm_workers))
        controller = get_controller()
        run_id = uuid.uuid4().hex
        # The function travels only as fn_bytes (by value): pickled inside the spec it would go by
        # reference, and the controller cannot import a test module or a notebook's module.
        ref = controller.run.remote(run_id, dataclasses.replace(spec, train_fn=None), fn_bytes, lease)
        progress = _Progress()
        try:
            while True:
                ready, _ = ray.wait([ref], timeout=0.5 if progress.on else 2.0)
                if ready:
                    break
                progress.show(ray.get(controller.progress.remote(run_id)))
        except KeyboardInterrupt:
            try:
                ray.get(controller.abort.remote(run_id), timeout=10)
                ray.get(ref, timeout=30)
            except Exception:  # noqa: BLE001 - the interrupt is what the user sees
                pass
            raise
        finally:
            progress.close()
        try:
            status, payload = ray.get(ref)
        finally:
            if _inside_ray_worker():
                # A fit run from a Ray task or actor (a Tune trial): the process ends with the task,
                # but its warm workers' placement group is scoped to the job and would keep their
                # resources reserved, so the next trial could not place its workers.
                release_warm_workers()
        if status == "error":
            raise payload
        return payload
