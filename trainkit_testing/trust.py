"""Generated fault schedules against the run folder's promises: no acknowledged checkpoint lost,
no run left corrupted. What ``benchmarks/bench_fault_schedules.py`` runs by the hundred and CI
runs a fixed sample of.

A schedule is one fault kind plus its seeded parameters, hitting a local-mode run of
``STEPS`` checkpointed reports (the training function writes its step into each checkpoint
and, after each ``report()`` returns, appends the index to an *ack file* on local disk: what
the user was told is durable):

* ``disk_full``: the run folder is on a small local disk (a tmpfs of a random size, root
  only) that fills up; then the disk is enlarged and the run resumed;
* ``enospc``: an object store's quota runs out after a random number of bytes (``FaultyDisk``);
* ``torn``: the k-th PUT breaks off half-way with ``EIO`` (retried);
* ``put_fail``: S3 (moto) refuses the next m PUTs, transiently (``SlowDown``, retried) or for
  good (``AccessDenied``);
* ``raise``: the training function raises after report k (``max_failures`` 0 or 1);
* ``driver_kill``: the driver process is SIGKILLed after report k;
* ``second_driver``: a second driver fits the same run while the first one runs.

After the fault, one clean ``fit()`` of the same run resumes it to the end. Then:
*lost* counts acknowledged checkpoints that a resume did not start from or past (the
first attempt after the fault started below the last acknowledged index, or the final
lineage misses an acknowledged index); *corrupted* counts runs whose folder
``trainkit diagnose`` finds problems in, whose status is not ``finished``, whose report
history is not exactly 1..STEPS, or whose latest checkpoint does not hold STEPS.

Runs in the test or benchmark process (and drivers it starts as subprocesses).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Optional

from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

STEPS = 6
KINDS = ("disk_full", "enospc", "torn", "put_fail", "raise", "driver_kill", "second_driver")
SUBPROCESS_KINDS = ("driver_kill", "second_driver")


class FaultyDisk(MemoryFileSystem):
    """A private in-memory object store whose PUTs fail: ``ENOSPC`` (a quota) once ``limit_bytes`` are
    used, or the ``torn_at``-th PUT breaks off half-way with ``EIO``. As on S3, an object appears only
    when its PUT completes: a failed one leaves the old object (or none). ``heal()`` ends the faults."""

    protocol = ("faultydisk",)

    def __init__(self, limit_bytes: float = float("inf"), torn_at: Optional[int] = None):
        super().__init__(skip_instance_cache=True)
        self.store, self.pseudo_dirs = {}, [""]
        self.limit_bytes, self.torn_at = limit_bytes, torn_at
        self.used = self.writes = 0

    def heal(self) -> None:
        self.limit_bytes, self.torn_at = float("inf"), None

    def charge(self, path: str, n: int) -> None:
        self.writes += 1
        if self.torn_at is not None and self.writes == self.torn_at:
            raise OSError(errno.EIO, "the connection broke off half-way through the PUT (injected)", path)
        if self.used + n > self.limit_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.used += n

    def _open(self, path, mode="rb", **kwargs):
        if mode in ("wb", "xb", "w+b", "ab"):
            path = self._strip_protocol(path)
            if mode == "xb" and path in self.store:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            old = self.store[path].getvalue() if mode == "ab" and path in self.store else None
            f = _PutFile(self, path, old)
            if old is not None:
                f.seek(0, 2)
            if kwargs.get("data") is not None:  # pipe_file: the whole object in one PUT
                f.write(kwargs["data"])
                f.close()
            return f
        return super()._open(path, mode, **kwargs)


class _PutFile(MemoryFile):
    """Buffers the object; the PUT happens at close, all or nothing."""

    def close(self):
        if getattr(self, "_put", False):
            return
        self._put = True
        self.fs.charge(self.path, len(self.getvalue()))
        self.commit()

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()


def mount_small_disk(path: str, size_bytes: int) -> bool:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (root only); False where that is not allowed."""
    os.makedirs(path, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path], capture_output=True)
    return got.returncode == 0


def resize_disk(path: str, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", path], check=True, capture_output=True)


def unmount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


@dataclass
class Outcome:
    """One schedule's verdict."""

    kind: str
    params: dict
    acked: list  # indices whose report() returned before or during the fault
    resumed_from: Optional[int] = None  # start index of the first attempt after the fault
    lost: list = field(default_factory=list)
    corrupted: list = field(default_factory=list)  # what is wrong with the folder, in words
    wall_s: float = 0.0
    skipped: str = ""  # why the schedule could not run here (disk_full without root)


def _train(config):
    import trainkit
    from trainkit import Checkpoint

    ck = trainkit.get_checkpoint()
    start = 0
    if ck is not None:
        with ck.as_directory() as d:
            start = int(open(os.path.join(d, "step")).read())
    for step in range(start + 1, config["steps"] + 1):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "step"), "w") as f:
                f.write(str(step))
            with open(os.path.join(d, "weights.bin"), "wb") as f:
                f.write(bytes([step % 256]) * config.get("ckpt_bytes", 2000))
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(d))
        with open(config["acks"], "a") as f:
            f.write(f"{step}\n")
        if step == config.get("raise_after"):
            raise RuntimeError(f"injected after report {step}")
        if step == config.get("hold_after"):
            while not os.path.exists(config["release"]):
                time.sleep(0.02)
        if step == config.get("kill_after"):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(config.get("step_s", 0.0))


def _fit(run_root: str, name: str, config: dict, fs=None, max_failures: int = 0):
    from trainkit import FailureConfig, RunConfig, ScalingConfig
    from trainkit.trainer import DataParallelTrainer

    return DataParallelTrainer(_train, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                               run_config=RunConfig(name=name, storage_path=run_root, storage_filesystem=fs,
                                                    failure_config=FailureConfig(max_failures=max_failures))).fit()


_DRIVER = textwrap.dedent("""
    import json, sys
    from trainkit_testing.trust import _fit
    root, name, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    try:
        _fit(root, name, config)
    except Exception as e:
        print("DRIVER-ERROR", type(e).__name__, e, flush=True)
        sys.exit(1)
""")


def _acks(path: str) -> list:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _driver(root: str, name: str, config: dict) -> subprocess.Popen:
    env = dict(os.environ, TRAINKIT_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-c", _DRIVER, root, name, json.dumps(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def draw(rng: random.Random, kind: str) -> dict:
    """The seeded parameters of one schedule of ``kind``."""
    if kind == "disk_full":
        return {"size_kib": rng.randrange(24, 200, 4)}
    if kind == "enospc":
        return {"limit_bytes": rng.randrange(1500, 30000)}
    if kind == "torn":
        return {"torn_at": rng.randrange(1, 40)}
    if kind == "put_fail":
        return {"puts": rng.randrange(1, 4), "permanent": rng.random() < 0.5}
    if kind == "raise":
        return {"after": rng.randrange(1, STEPS), "max_failures": rng.choice((0, 1))}
    if kind == "driver_kill":
        return {"after": rng.randrange(1, STEPS)}
    return {"after": rng.randrange(1, STEPS - 1)}  # second_driver: joins while the first holds at report k


def run_schedule(kind: str, params: dict, workdir: str, *, s3_root: Optional[str] = None) -> Outcome:
    """Run one schedule in ``workdir`` (a fresh folder) and judge it; ``put_fail`` runs on ``s3_root``
    (an ``s3://bucket/prefix`` on a moto server) when given, else on local disk."""
    from trainkit.errors import TrainkitError

    t0 = time.monotonic()
    acks = os.path.join(workdir, "acks")
    config = {"steps": STEPS, "acks": acks}
    root, name, fs = os.path.join(workdir, "runs"), "run", None
    out = Outcome(kind, params, [])
    if kind == "disk_full":
        root = os.path.join(workdir, "disk")
        if not mount_small_disk(root, params["size_kib"] * 1024):
            out.skipped = "a small disk cannot be mounted here (mount -t tmpfs needs root)"
            return out
        try:
            try:
                _fit(root, name, dict(config, ckpt_bytes=6000))
            except (TrainkitError, OSError):
                pass
            resize_disk(root, 64 * 2**20)
            out.acked = _acks(acks)
            before = len(out.acked)
            _judge_resume(out, root, name, config, None)
            out.acked = out.acked[:before]
            _judge_folder(out, root, name, None)
        finally:
            unmount(root)
        out.wall_s = round(time.monotonic() - t0, 3)
        return out
    if kind in ("enospc", "torn"):
        fs = FaultyDisk(limit_bytes=params.get("limit_bytes", float("inf")), torn_at=params.get("torn_at"))
        root = "/runs"
        try:
            _fit(root, name, config, fs)
        except (TrainkitError, OSError):  # the fault ends the fit: it must do so cleanly (checked below)
            pass
        fs.heal()
    elif kind == "put_fail":
        from trainkit import storage as tk_storage

        root = s3_root or root
        left = {"n": params["puts"]}

        def refuse(operation, path):
            if left["n"] > 0:
                left["n"] -= 1
                if params["permanent"]:
                    raise PermissionError(errno.EACCES, "AccessDenied (injected)", path)
                raise OSError(errno.EAGAIN, "SlowDown: please reduce your request rate (injected)", path)

        tk_storage.set_fault_hook(refuse)
        try:
            _fit(root, name, config)
        except (TrainkitError, OSError):
            pass
        finally:
            tk_storage.set_fault_hook(None)
    elif kind == "raise":
        try:
            _fit(root, name, dict(config, raise_after=params["after"]), max_failures=params["max_failures"])
        except TrainkitError:
            pass
    elif kind == "driver_kill":
        proc = _driver(root, name, dict(config, kill_after=params["after"]))
        proc.communicate(timeout=120)
    elif kind == "second_driver":
        release = os.path.join(workdir, "release")
        proc = _driver(root, name, dict(config, hold_after=params["after"], release=release))
        try:
            deadline = time.monotonic() + 60
            while len(_acks(acks)) < params["after"] and time.monotonic() < deadline:
                time.sleep(0.02)
            try:
                _fit(root, name, dict(config, acks=acks + ".second"))
                out.corrupted.append("a second driver ran the same run while its first driver was alive")
            except TrainkitError:
                pass  # refused at once: the run has an owner
        finally:
            open(release, "w").close()
            proc.communicate(timeout=120)
    out.acked = _acks(acks)
    before = len(out.acked)
    _judge_resume(out, root, name, config, fs)
    out.acked = out.acked[:before]
    _judge_folder(out, root, name, fs)
    out.wall_s = round(time.monotonic() - t0, 3)
    return out


def _judge_resume(out: Outcome, root: str, name: str, config: dict, fs) -> None:
    from trainkit import events as ev
    from trainkit.storage import EVENTS, RunStore

    store = RunStore(root, name, fs)
    seen = len(ev.parse_events(store.read_bytes(EVENTS) or b"").events)
    try:
        result = _fit(root, name, config, fs)
    except Exception as e:  # noqa: BLE001 - a run that cannot be resumed is corrupted
        out.corrupted.append(f"the resume failed: {type(e).__name__}: {e}")
        return
    events = ev.parse_events(store.read_bytes(EVENTS) or b"").events[seen:]
    first = next((e for e in events if isinstance(e, ev.AttemptStarted)), None)
    out.resumed_from = first.start_index if first else None
    last_ack = max(out.acked, default=0)
    if out.resumed_from is not None and out.resumed_from < last_ack:
        out.lost += [i for i in out.acked if i > out.resumed_from]
    if result.metrics.get("step") != STEPS:
        out.corrupted.append(f"the resumed run ended at step {result.metrics.get('step')}, not {STEPS}")


def _judge_folder(out: Outcome, root: str, name: str, fs) -> None:
    from trainkit import Result
    from trainkit.diagnostics.run_report import load_report
    from trainkit.storage import RunStore

    store = RunStore(root, name, fs)
    rep = load_report(store)
    if rep.problems:
        out.corrupted += [f"diagnose: {p}" for p in rep.problems]
    if rep.status != "finished":
        out.corrupted.append(f"status {rep.status}, not finished")
    try:
        res = Result.from_path(store.run_path if fs is not None else store.uri, storage_filesystem=fs)
    except Exception as e:  # noqa: BLE001
        out.corrupted.append(f"Result.from_path failed: {type(e).__name__}: {e}")
        return
    steps = [int(s) for s in res.metrics_dataframe["step"]] if res.metrics_dataframe is not None else []
    if steps != list(range(1, STEPS + 1)):
        out.corrupted.append(f"the report history is {steps}, not 1..{STEPS}")
        out.lost += [i for i in out.acked if i not in steps]
    if res.checkpoint is None:
        out.corrupted.append("no checkpoint in the result")
    else:
        with res.checkpoint.as_directory() as d:
            got = open(os.path.join(d, "step")).read()
        if got != str(STEPS):
            out.corrupted.append(f"the latest checkpoint holds step {got}, not {STEPS}")
    out.lost = sorted(set(out.lost))


def schedules(n: int, seed: int, kinds=KINDS, subprocess_share: float = 0.15) -> list[tuple[str, dict]]:
    """``n`` seeded schedules: the in-process kinds in turn, and about ``subprocess_share`` of them
    with a driver process (they cost a Python start each)."""
    rng = random.Random(seed)
    local = [k for k in kinds if k not in SUBPROCESS_KINDS]
    remote = [k for k in kinds if k in SUBPROCESS_KINDS]
    out = []
    for i in range(n):
        pool = remote if remote and (not local or rng.random() < subprocess_share) else local
        kind = pool[i % len(pool)] if pool is local else rng.choice(pool)
        out.append((kind, draw(rng, kind)))
    return out
