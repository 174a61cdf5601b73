"""``RankWorker``: one Ray actor per rank. Runs in the worker process.

The actor is threaded: ``run`` executes the training function in one of its threads
and returns a small record (value or failure) when the function ends, so the
controller learns of an exception at once and of a dead process from Ray. Other
methods (ping, dump, preempt) stay answerable while training runs. A worker outlives
one run: the controller keeps healthy groups warm and reuses them for the next fit.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import tempfile
import threading

from typing import Any, Optional

import ray

from trainkit.backends import api
from trainkit.backends.ray.channel import ChannelClient, ChannelUnavailable
from trainkit.diagnostics import debug as _debug
from trainkit.diagnostics.memory import MemoryWatch
from trainkit.errors import ReportError
from trainkit.session import RankInfo, ReportReply, Session


class _Interrupted(BaseException):
    """Raised in a rank's training thread when the controller ends the attempt (resize, abort)."""


class RayCoordinator:
    """A rank's side of the report barrier: one call to the controller per round, over the
    controller's report channel (``channel``: its address) or as an actor call."""

    def __init__(self, controller, run_id: str, attempt: int, channel: Optional[tuple] = None):
        self.controller = controller
        self.run_id = run_id
        self.attempt = attempt
        self._channel = ChannelClient(channel) if channel else None

    def _call(self, method: str, *args):
        return self._reply(*ray.get(getattr(self.controller, method).remote(self.run_id, self.attempt, *args)))

    def _round(self, method: str, *args) -> tuple:
        """``(status, value)`` of the rank's arrival at a round (report or collective)."""
        if self._channel is not None:
            try:
                return self._channel.call(method, self.run_id, self.attempt, *args)
            except ChannelUnavailable as e:  # nothing was sent: the actor call counts it once
                print(f"trainkit: {e}; using actor calls for this run", file=sys.stderr)  # in the rank log
                self._channel = None
        return ray.get(getattr(self.controller, method).remote(self.run_id, self.attempt, *args))

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    @staticmethod
    def _reply(status: str, value):
        if status == "error":
            raise value
        if status == "stop":
            raise _Interrupted(value)
        return value

    def report(self, world_rank, index, metrics, checkpoint_dir, files) -> ReportReply:
        status, value = self._round("report", world_rank, index, metrics, checkpoint_dir, files)
        if status == "committed_then_stop":  # committed: the rank completes its report, then stops
            checkpoint, why = value
            return ReportReply(checkpoint, then_raise=_Interrupted(why))
        return ReportReply(self._reply(status, value))

    def collective(self, world_rank, op, seq, payload):
        return self._reply(*self._round("collective", world_rank, op, seq, payload))

    def reported_checkpoints(self):
        return self._call("reported_checkpoints")

    def record_fault(self, fields: dict) -> bool:
        return self._call("record_fault", fields)

    def validated(self, checkpoint_dir: str, metrics: dict, status: str) -> None:
        return self._call("validated", checkpoint_dir, metrics, status)


class _RankStream(io.TextIOBase):
    """Writes each line to the process's stream with a ``[rank r]`` prefix, and to a log file."""

    def __init__(self, inner, prefix: str, log):
        self._inner = inner
        self._prefix = prefix
        self._log = log
        self._buf = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self._inner.write(f"{self._prefix}{line}\n")
                if self._log is not None:
                    self._log.write(line + "\n")
            self._inner.flush()
            if self._log is not None:
                self._log.flush()
        return len(s)

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                self._inner.write(f"{self._prefix}{self._buf}")
                if self._log is not None:
                    self._log.write(self._buf)
                self._buf = ""
            self._inner.flush()


@ray.remote(max_concurrency=8, max_restarts=0)
class RankWorker:
    def __init__(self):
        self._preempted = threading.Event()
        self._thread_ident: Optional[int] = None
        self._session: Optional[Session] = None
        self._run_ref: Optional[tuple] = None  # (controller, run_id, attempt, world_rank) while running
        try:  # SIGTERM is a preemption notice: the function sees is_preempted() and can checkpoint
            import signal

            signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
                target=self.preempt, args=(_sigterm_grace_s(),), daemon=True).start())
        except ValueError:  # not the main thread
            pass
        from trainkit.diagnostics.stacks import install_signal_dump

        install_signal_dump()  # SIGUSR2 dumps all stacks (the hang monitor's fallback when py-spy cannot)

    def setup(self) -> dict:
        import torch  # noqa: F401 - warm the import before the first run

        ctx = ray.get_runtime_context()
        from trainkit.diagnostics.stacks import host_id

        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "host": host_id()}

    def warm(self, controller, fn_bytes: bytes, modules: tuple = ()) -> None:
        """A hot spare's rehearsal of what its first ``run()`` does first, so that a rank it replaces
        starts at once: the imports (trainkit's, and ``modules``: what a running rank of the group
        imported, such as the training function's own imports), unpickling the training function,
        a call to the controller."""
        import torch.distributed  # noqa: F401

        from trainkit._serialize import loads_train_fn
        from trainkit.checkpoint import Checkpoint  # noqa: F401

        _import_all(modules)
        loads_train_fn(fn_bytes)
        ray.get(controller.ping.remote())

    def modules(self) -> list:
        """The modules this process imported from files, parents first (for a spare's ``warm``)."""
        return sorted(name for name, m in list(sys.modules.items())
                      if not name.startswith("__") and isinstance(getattr(m, "__file__", None), str))

    def ping(self) -> int:
        """This process's pid; an error once it had a preemption notice (it is going away, never reuse it)."""
        if self._preempted.is_set():
            raise RuntimeError(f"worker {os.getpid()} had a preemption notice")
        return os.getpid()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def preempt(self, grace_s: float = 0.0) -> None:
        """Tell the controller, then mark this rank preempted (also on SIGTERM). The function sees
        is_preempted() only once the controller knows: the report it makes next (over the report
        channel, which could overtake an unawaited actor call) then stops the attempt."""
        ref = self._run_ref
        if ref is not None:
            controller, run_id, attempt, rank = ref
            try:
                ray.get(controller.preempted.remote(run_id, attempt, rank, float(grace_s)), timeout=10)
            except ray.exceptions.RayError:  # the controller is gone or stuck: the rank still sees its notice
                pass
        self._preempted.set()

    def init_process_group(self, master_addr: str, master_port: int, info: dict, backend: str,
                           timeout_s: float, cuda_visible: Optional[str]) -> None:
        import datetime

        import torch.distributed as dist

        env = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(info["world_rank"]),
               "WORLD_SIZE": str(info["world_size"]), "LOCAL_RANK": str(info["local_rank"]),
               "LOCAL_WORLD_SIZE": str(info["local_world_size"]), "NODE_RANK": str(info["node_rank"])}
        os.environ.update(env)
        if cuda_visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
        if backend == "nccl":
            import torch

            torch.cuda.set_device(info["local_rank"] % max(torch.cuda.device_count(), 1))
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=info["world_rank"], world_size=info["world_size"],
                                timeout=datetime.timedelta(seconds=timeout_s))

    def run(self, fn_bytes: bytes, takes_config: bool, config: Any, info: dict, store, controller,
            run_id: str, start: dict, datasets: dict, hooks: list, log_path: Optional[str],
            channel: Optional[tuple] = None) -> dict:
        """Run the training function on this rank; return {"ok": value} or {"failure": {...}}.
        ``channel``: the controller's report channel address (None: rounds are actor calls)."""
        from trainkit._serialize import loads_train_fn

        self._preempted.clear()
        rank_info = RankInfo(**info)
        ckpt = None
        if start.get("dir"):
            from trainkit.checkpoint import Checkpoint

            ckpt = Checkpoint(store.path(start["dir"]), store.fs)
        coordinator = RayCoordinator(controller, run_id, rank_info.attempt, channel)
        session = Session(rank_info, store, coordinator,
                           experiment_name=store.name, start_checkpoint=ckpt, start_index=start.get("index", 0),
                           datasets=datasets, hooks=hooks, preempted=self._preempted)
        log = None
        local_log = None  # the file written during the run: in the run folder, or a temp file for remote storage
        if log_path:
            try:
                if store.local:
                    local_log = store.path(log_path)
                    os.makedirs(os.path.dirname(local_log), exist_ok=True)
                else:
                    fd, local_log = tempfile.mkstemp(prefix="trainkit_rank_", suffix=".log")
                    os.close(fd)
                log = open(local_log, "a")
            except OSError:
                log = None
        old_out, old_err = sys.stdout, sys.stderr
        prefix = f"[rank {rank_info.world_rank}] "
        sys.stdout = _RankStream(old_out, prefix, log)
        sys.stderr = _RankStream(old_err, prefix, log)
        self._thread_ident = threading.get_ident()
        self._session = session
        self._run_ref = (controller, run_id, rank_info.attempt, rank_info.world_rank)
        installed = contextlib.ExitStack()
        installed.enter_context(api.install_session(session))
        installed.enter_context(MemoryWatch())  # so that a death for memory is told apart (oom)
        emit = lambda event: ray.get(controller.record_event.remote(run_id, rank_info.attempt, event))  # noqa: E731
        try:
            _debug.before_run(session.context, hooks, emit)  # TRAINKIT_DEBUG_RANK: wait for a debugger
            fn = loads_train_fn(fn_bytes)
            value = fn(config if config is not None else {}) if takes_config else fn()
            session.drain()  # an ASYNC report in flight and rank 0's validations end with the function
            return {"ok": True, "value": value, "index": session.index}
        except _Interrupted as e:
            return {"ok": False, "interrupted": str(e), "index": session.index}
        except BaseException as e:  # noqa: BLE001 - reported to the controller as this rank's failure
            _debug.after_error(session.context, hooks, e, emit)  # RankDebugger(post_mortem_s=...)
            failure = api.failure_from(e, rank_info.world_rank)
            if isinstance(e, ReportError):
                failure.kind = "mismatch"
            return {"ok": False, "index": session.index, "failure": failure}
        finally:
            installed.close()
            coordinator.close()
            self._session = None
            self._run_ref = None
            self._thread_ident = None
            for s in (sys.stdout, sys.stderr):
                try:
                    s.flush()
                except Exception:  # noqa: BLE001
                    pass
            sys.stdout, sys.stderr = old_out, old_err
            if log is not None:
                log.close()
                if not store.local:
                    _upload_log(store, local_log, log_path)
            try:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group is torn down with the process anyway
                pass


def _import_all(names) -> None:
    """Import each of ``names`` not imported yet, quietly; one that fails is left out (it imported
    in another rank's process, in its own order; the training function imports it again if it needs it)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except (Exception, SystemExit):  # noqa: BLE001
                pass


def _upload_log(store, local_log: str, rel: str) -> None:
    """Copy a rank's log to remote storage at the end of its run (best effort: a log never fails a run)."""
    try:
        store.fs.makedirs(store.path(rel.rsplit("/", 1)[0]), exist_ok=True)
        store.fs.put(local_log, store.path(rel))
    except Exception as e:  # noqa: BLE001
        print(f"trainkit: could not upload {rel} to {store.run_path}: {type(e).__name__}: {e}", file=sys.__stderr__)
    finally:
        try:
            os.remove(local_log)
        except OSError:
            pass


def _sigterm_grace_s() -> float:
    """The grace period of a SIGTERM notice: $TRAINKIT_PREEMPTION_GRACE_S, read when the signal arrives."""
    from trainkit import _env

    try:
        return float(_env.PREEMPTION_GRACE_S.get_float() or 0.0)
    except ValueError:  # a malformed value: the documented default, 0 (grace unknown)
        return 0.0
