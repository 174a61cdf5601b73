"""Local mode (``num_workers=0``): the training function runs in the calling process.

Unlike Ray Train's local mode, the full contract holds: checkpoints persist to storage,
retention applies, a re-run with the same name resumes, ``max_failures`` re-runs the
function in-process, and the event stream is written.

Under ``torchrun`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` all set) each process is one rank: the process group
is initialised (gloo on CPU, NCCL on GPU), rank 0 holds the run's lease (``trainkit.lease``)
and keeps the ledger, and ``report()`` is a barrier through a gloo side group. A failure to open
the run on rank 0 (another driver owns it, a folder that is not a run's) is raised on every rank. Restarts under torchrun are torchrun's own
(``--max-restarts``); a restarted torchrun job with the same ``RunConfig.name`` resumes.
Runs in the driver (or each torchrun process).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Optional

from trainkit.backends import api
from trainkit.backends import barrier, decide
from trainkit.config import FailureConfig
from trainkit.config import PROCESS_GROUP_TIMEOUT_S
from trainkit.errors import ReportError, StorageError, TrainingFailedError
from trainkit.lease import Lease
from trainkit.ledger import RunLedger
from trainkit.result import load_result
from trainkit.session import RankInfo, ReportReply
from trainkit.storage import RunStore

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env() -> Optional[dict]:
    if all(v in os.environ for v in TORCHRUN_VARS):
        return {v: os.environ[v] for v in TORCHRUN_VARS}
    return None


class TorchDistCoordinator:
    """Ranks are torchrun processes; rank 0 owns the ledger. Rounds go over a gloo group."""

    def __init__(self, ledger: Optional[RunLedger], attempt: int, world_rank: int, world_size: int, group):
        self.ledger = ledger
        self.attempt = attempt
        self.rank = world_rank
        self.world_size = world_size
        self.group = group

    def _round(self, msg: tuple, decide) -> Any:
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(msg, gathered, dst=0, group=self.group)
        reply: list = [None]
        if self.rank == 0:
            try:
                err = barrier.gathered_mismatch([(m[0], m[1]) for m in gathered],
                                                [m[2] if m[0] == "finish" else None for m in gathered])
                if err is not None:
                    raise err
                reply[0] = ("ok", decide(gathered))
            except Exception as e:  # noqa: BLE001 - sent to every rank, raised there
                reply[0] = ("error", e)
        dist.broadcast_object_list(reply, src=0, group=self.group)
        status, value = reply[0]
        if status == "error":
            raise value
        return value

    def report(self, world_rank, index, metrics, checkpoint_dir, files) -> ReportReply:
        t0 = time.perf_counter()

        def commit(gathered):
            metrics, d, files = barrier.report_payload(index, {r: m[2:5] for r, m in enumerate(gathered)})
            self.ledger.commit(self.attempt, index, metrics, d, files, world_size=self.world_size,
                               barrier_s=time.perf_counter() - t0, rank_metrics=[m[2] or {} for m in gathered])
            return d

        return ReportReply(self._round(("report", index, metrics, checkpoint_dir, files), commit))

    def collective(self, world_rank, op, seq, payload):
        return self._round((op, seq, payload if world_rank == 0 else None, None, None),
                           lambda gathered: gathered[0][2])

    def validated(self, checkpoint_dir: str, metrics: dict, status: str) -> None:
        if self.ledger is not None:  # validations run on rank 0, which holds the ledger
            self.ledger.validated(checkpoint_dir, metrics, status)

    def finish(self, reports: int) -> None:
        """Every rank returned from the training function; ``reports`` is this rank's report count."""
        self._round(("finish", 1, reports, None, None), lambda gathered: None)

    def reported_checkpoints(self):
        def listing(_g):
            return self.ledger.reported_checkpoints()

        return self._round(("reported_checkpoints", 0, None, None, None), listing)


class LocalBackend:
    name = "local"
    capabilities = frozenset({api.FAULT_INJECTION, api.DURABLE_REPORT})
    handles_local_mode = True
    needs_ray = False

    def run(self, spec: api.TrainSpec):
        tr = torchrun_env()
        if tr is not None and int(tr["WORLD_SIZE"]) >= 1:
            return _run_torchrun(spec, tr)
        return api.run_attempts(spec, backend_name="local", num_workers=0)


def _restart_store(rank: int, world_size: int, timeout) -> dict:
    """``init_process_group`` keywords giving a torchrun restart its own keys in the agent's store.

    torchrun's static rendezvous (``--master-addr/--master-port``) keeps one TCPStore for the
    whole job, and workers use it unprefixed (``TORCHELASTIC_USE_AGENT_STORE``). After a
    ``--max-restarts`` restart, a new rank can read a dead rank's gloo address from the previous
    round and fail with "Connection refused" (measured here: 1 restart in 3). Prefixing by
    ``TORCHELASTIC_RESTART_COUNT`` gives every round fresh keys. Outside torchelastic's agent
    store: no keywords (torch's own ``env://``).
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return {}
    import torch.distributed as dist

    store = dist.TCPStore(host_name=env["MASTER_ADDR"], port=int(env["MASTER_PORT"]), world_size=world_size,
                          is_master=False, timeout=timeout)
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"trainkit/restart-{restart}", store), "rank": rank, "world_size": world_size}


def _run_torchrun(spec: api.TrainSpec, env: dict):
    import torch
    import torch.distributed as dist

    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank, local_ws = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    owned = not dist.is_initialized()
    if owned:
        use_cuda = torch.cuda.is_available()
        tc = spec.torch_config
        backend = getattr(tc, "backend", None) or ("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        import datetime

        timeout = datetime.timedelta(seconds=getattr(tc, "timeout_s", PROCESS_GROUP_TIMEOUT_S))
        dist.init_process_group(backend=backend, timeout=timeout, **_restart_store(rank, world_size, timeout))
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    rc = spec.run_config
    # Every process resolved its own default name: rank 0's wins.
    shared = [(rc.name, rc.storage_path)]
    dist.broadcast_object_list(shared, src=0, group=group)
    name, storage_path = shared[0]
    store = RunStore(storage_path, name, rc.storage_filesystem)
    ledger = lease = None
    boot: list = [None]
    if rank == 0:
        try:
            store.check_owned()
            lease = Lease.acquire(store, backend="local/torchrun").start()  # before anything is written
            ledger = RunLedger(store, rc.checkpoint_config, backend="local/torchrun", num_workers=world_size,
                               lease=lease)
            api.subscribe_callbacks(ledger, spec)
            attempt = ledger.start_attempt(world_size)
            boot[0] = ("ok", (attempt, ledger.state["latest_checkpoint"], ledger.latest_index))
        except Exception as e:  # noqa: BLE001 - raised on every rank, not left waiting in the broadcast
            boot[0] = ("error", e)
    try:
        dist.broadcast_object_list(boot, src=0, group=group)
        status, value = boot[0]
        if status == "error":
            raise value
        return _run_rank(spec, store, ledger, value, group, rank, world_size, local_rank, local_ws, name)
    finally:
        if lease is not None:
            lease.release()
        group = None
        if owned:
            import gc

            gc.collect()
            dist.destroy_process_group()


FAILURE_WAIT_S = 1.0  # how long rank 0, failing, waits for the failure records of ranks that failed before it


def _failure_path(attempt: int, rank: int) -> str:
    return f"logs/attempt-{attempt}/failure-rank-{rank}.json"


def _leave_failure(store: RunStore, attempt: int, failure, failed_at: float) -> None:
    """A rank other than 0 failed: its record, with when, for rank 0 (which records the run)."""
    try:
        store.makedirs(f"logs/attempt-{attempt}")
        store.write_json_atomic(_failure_path(attempt, failure.world_rank), {"time": failed_at, **failure.to_dict()})
    except StorageError:  # rank 0 then names only what it saw
        pass


def _first_failures(store: RunStore, attempt: int, world_size: int, own, failed_at: float) -> list:
    """Rank 0's failure and the records the other ranks left, the first to fail first. Rank 0 waits up to
    ``FAILURE_WAIT_S`` for them when its own failure is a broken collective (a peer that died or raised)."""
    from trainkit.errors import WorkerFailure

    collateral = own.kind == "collective" or any(c in own.message for c in decide.COLLATERAL)
    deadline = time.monotonic() + (FAILURE_WAIT_S if collateral else 0.0)
    found: dict = {}
    while True:
        for r in range(1, world_size):
            if r not in found:
                with contextlib.suppress(StorageError, ValueError):
                    rec = store.read_json(_failure_path(attempt, r))
                    if isinstance(rec, dict):
                        found[r] = rec
        if len(found) == world_size - 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    timed = [(failed_at, own)] + [(rec.get("time", failed_at), WorkerFailure.from_dict(rec)) for rec in found.values()]
    timed.sort(key=lambda t: t[0])
    return decide.root_cause_first([f for _, f in timed])


class Terminated(Exception):
    """torchrun's agent stopped rank 0 (SIGTERM) because another rank failed: rank 0 records the run."""


def _on_sigterm(recording: list):
    """Rank 0 turns torchrun's SIGTERM (sent when another rank failed) into ``Terminated``, so that it
    records the failure (the failed rank's, found in its record) before it exits; while it records,
    a SIGTERM waits. Returns the previous handler (None off the main thread)."""
    import signal

    def handler(signum, frame):
        if not recording:
            raise Terminated("torchrun stopped this rank (SIGTERM): another rank failed")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _run_rank(spec, store, ledger, boot, group, rank, world_size, local_rank, local_ws, name):
    attempt, latest_dir, latest_index = boot
    from trainkit.checkpoint import Checkpoint

    start_ckpt = Checkpoint(store.path(latest_dir), store.fs) if latest_dir else None
    info = RankInfo(world_rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_ws,
                    node_rank=rank // max(local_ws, 1), node_id=os.environ.get("GROUP_RANK", "0"), attempt=attempt)
    coord = TorchDistCoordinator(ledger, attempt, rank, world_size, group)
    group = None  # only coord holds it: a traceback keeping this frame must not keep the group alive
    session = api.Session(info, store, coord, experiment_name=name, start_checkpoint=start_ckpt,
                          start_index=latest_index, datasets=spec.datasets, hooks=api.worker_hooks(spec))
    recording = []  # set while rank 0 records a failure: a SIGTERM then waits for the record
    previous = _on_sigterm(recording) if ledger is not None else None
    try:
        with api.install_session(session):
            try:
                value = api.call_train_fn(spec)
                session.drain()  # an ASYNC report in flight and rank 0's validations end with the function
                # A rank that returns while others still report is a mismatch, found here at once.
                coord.finish(session.index)
            except Exception as e:  # noqa: BLE001
                recording.append(True)
                # fit() raises what Result.from_path will show: one TrainingFailedError in every mode.
                if isinstance(e, TrainingFailedError):
                    failures, error, kind = e.failures, e, "failure"
                else:
                    failure = api.failure_from(e, rank)
                    if isinstance(e, ReportError):
                        failure.kind = "mismatch"
                    failed_at = time.time()
                    if ledger is None:  # rank 0 records the run: leave it this rank's failure, and when
                        _leave_failure(store, attempt, failure, failed_at)
                        failures = [failure]
                    else:  # the root cause is the rank that failed first, not rank 0's broken collective
                        failures = _first_failures(store, attempt, world_size, failure, failed_at)
                    # restarts under torchrun are torchrun's own (--max-restarts): this attempt fails
                    action, _ = decide.decide(decide.Outcome(failures=tuple(failures)), decide.Budget(),
                                              FailureConfig())
                    error, kind = action.error, action.kind
                if ledger is not None:
                    ledger.record_failure(attempt, failures, will_retry=False, kind=kind)
                    ledger.finish("failed", error)
                if error is e:
                    raise
                raise error from e
            if ledger is not None:
                ledger.finish("finished")
                result = ledger.result(return_value=value)
            coord.collective(rank, "finished", 1, None)
        if ledger is None:
            result = load_result(store.uri)
            result.return_value = value
        return result
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
        # Drop every reference to the gloo side group before destroying the process group:
        # one kept alive until interpreter exit aborts the process (SIGABRT) after a good run.
        coord.group = None
        session.coordinator = None
