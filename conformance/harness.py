"""How a conformance case runs a training function on the backend under test.

``resolve_backend(name)`` accepts a registered name (``ray``, ``local``, ``ray_train``, an
entry point) or ``module:attr`` (an unregistered backend, such as the suite's own broken
fixture). ``Harness.fit`` builds a ``TorchTrainer`` (so bad input is rejected exactly as
users see it) and hands its spec to the backend. Local mode (``workers=0``) goes to the
backend itself only when it declares ``handles_local_mode`` (``ray_train``: Ray Train's
own local mode); otherwise it is trainkit's local mode, which every trainkit backend shares.

Also here: ``ray_for(backend)`` (one private local Ray per pytest process for a backend
whose ``needs_ray`` trait says so: ``trainkit_testing.cluster.Cluster``, with its own
``RAY_TMPDIR`` so that it never joins another session's cluster) and small helpers that
training functions use inside workers. Runs in the pytest process and, for the helpers,
in workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from typing import Any, Callable, Iterator, Optional

from trainkit_testing.waiting import wait_for as _poll

NODES = 2  # virtual nodes of the private Ray (the layout and elastic cases need more than one)
CPUS_PER_NODE = 2  # logical CPUs per virtual node; the head has none (the driver and controllers run there)
RAY_CPUS = NODES * CPUS_PER_NODE  # the elastic cases read the capacity from Ray itself
DEFAULT_BOUND_S = 150.0  # a fit that has not ended after this long is a hung backend (a loaded 2-core box)


class CaseTimeout(Exception):
    """The backend under test did not end a fit within the case's bound; its Ray job's actors were
    killed so that the cases after it are unaffected."""

    def __init__(self, bound_s: float, torn_down: int = 0):
        self.bound_s = bound_s
        self.torn_down = torn_down
        super().__init__(f"the backend did not end the fit within the case's bound of {bound_s:g} s "
                         f"(hung); {torn_down} actor process(es) of its Ray job were killed")

    def __reduce__(self):
        return (type(self), (self.bound_s, self.torn_down))


_private_ray = False  # True while the suite runs on the private Ray that ray_for started


def teardown_ray_job() -> int:
    """Kill the processes of every live actor of this driver's Ray job (controllers, worker
    groups, Ray Train's actors): a hung run ends and its resources come back. Returns how many."""
    import signal

    import ray
    from ray._private import state

    if not ray.is_initialized():
        return 0
    job = ray.get_runtime_context().get_job_id()
    killed = 0
    for info in state.actors().values():
        if info.get("State") != "ALIVE" or str(info.get("JobID", "")) != job:
            continue
        pid = info.get("Pid") or 0
        if pid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    # Placement groups outlive the non-detached actor that created them (until the job ends): remove
    # them, or the next case cannot place its workers. Only on the suite's own private Ray: the table
    # does not say which job made a group, and on a Ray this process joined (the pytest plugin's
    # session cluster) other drivers' groups are live; removing them cancelled their actors.
    if not _private_ray:
        return killed
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, pg in ray.util.placement_group_table().items():
        if pg.get("state") not in ("REMOVED",):
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            except Exception:  # noqa: BLE001 - already gone
                pass
    return killed


class _Bound:
    """Arms a timer for one fit; when it fires the backend's Ray job is torn down, which makes the
    blocked ``fit()`` return with an error that ``Harness.fit`` turns into ``CaseTimeout``.
    In-process backends (no Ray) are left to pytest-timeout (the conftest sets it a little above)."""

    def __init__(self, bound_s: float, uses_ray: bool):
        import threading

        self.bound_s = bound_s
        self.fired = False
        self.killed = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="conformance-bound")
        self._uses_ray = uses_ray

    def _watch(self) -> None:
        if self._done.wait(self.bound_s) or not self._uses_ray:
            return
        self.fired = True
        self.killed = teardown_ray_job()

    def __enter__(self) -> "_Bound":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(30)


def resolve_backend(name: str):
    """The backend object for ``name`` (registered name or ``module:attr``)."""
    import conformance.broken  # noqa: F401 - registers the suite's broken-* self-test backends
    from trainkit.backends.api import available_backends, get_backend, register_backend

    if ":" in name and name not in available_backends():
        register_backend(name, name)  # so that TorchTrainer(backend=name) finds it too
    return get_backend(name)


@contextlib.contextmanager
def ray_for(backend: Any, env: Optional[dict] = None) -> Iterator[Any]:
    """A private local Ray (``NODES`` virtual nodes of ``CPUS_PER_NODE`` CPUs, a head with none)
    for the block, when ``backend`` needs Ray; yields its ``trainkit_testing.cluster.Cluster``
    (None when there is none, or when a Ray this process is already connected to is used as it is).
    ``env`` (the moto endpoint) goes into every Ray process's environment.
    """
    from trainkit_testing.cluster import Cluster, needs_ray

    if needs_ray(backend):
        import ray

        if not ray.is_initialized():
            global _private_ray
            with Cluster(nodes=NODES, cpus_per_node=CPUS_PER_NODE, head_cpus=0,
                         env={"TRAINKIT_PROGRESS": "0", **(env or {})}, fast_failure=False,
                         log_to_driver=False, tmp_prefix="tkconf-") as cluster:
                _private_ray = True
                try:
                    yield cluster
                finally:
                    _private_ray = False
            return
    yield None


@contextlib.contextmanager
def moto_for_suite() -> Iterator[Any]:
    """One moto S3 server for the session (None when moto is not installed); its environment
    is exported to this process (and, through ``ray_for``, to every Ray process)."""
    try:
        from trainkit_testing.s3 import AWS_UNSET, MotoS3
    except ImportError:
        yield None
        return
    try:
        server = MotoS3().start()
    except ImportError:
        yield None
        return
    saved = {k: os.environ.get(k) for k in list(server.env) + list(AWS_UNSET)}
    os.environ.update(server.env)
    for k in AWS_UNSET:
        os.environ.pop(k, None)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Harness:
    """One case's view of the backend: ``fit``, ``fails`` and a private folder.

    >>> result = tk.fit(train_fn, workers=2, config={"dir": tk.dir})  # doctest: +SKIP
    """

    def __init__(self, backend_name: str, backend: Any, base: str, *, bound_s: float = DEFAULT_BOUND_S,
                 cluster: Any = None, s3: Any = None):
        self.backend_name = backend_name
        self.backend = backend
        self.base = base
        self.bound_s = bound_s  # every fit of the case ends within this (CaseTimeout)
        self.cluster = cluster  # the private Ray's Cluster (virtual nodes), when the suite started one
        self.s3 = s3  # the session's MotoS3 server, or None
        self.dir = os.path.join(base, "files")  # where training functions write what they saw
        self.storage = os.path.join(base, "storage")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.storage, exist_ok=True)

    @property
    def capabilities(self) -> frozenset:
        return frozenset(getattr(self.backend, "capabilities", frozenset()))

    def new_name(self, prefix: str = "conf") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def trainer(self, fn: Callable, *, workers: Any = 1, config: Optional[dict] = None, name: Optional[str] = None,
                max_failures: int = 0, checkpoint_config: Any = None, datasets: Optional[dict] = None,
                hang_config: Any = None, storage_path: Optional[str] = None, run_options: Optional[dict] = None,
                scaling_options: Optional[dict] = None):
        import trainkit
        from trainkit.torch import TorchTrainer

        rc = trainkit.RunConfig(name=name or self.new_name(), storage_path=storage_path or self.storage,
                                failure_config=trainkit.FailureConfig(max_failures=max_failures),
                                checkpoint_config=checkpoint_config, hang_config=hang_config, **(run_options or {}))
        sc = trainkit.ScalingConfig(num_workers=workers, **(scaling_options or {}))
        return TorchTrainer(fn, train_loop_config=config, scaling_config=sc,
                            run_config=rc, datasets=datasets, backend=self.backend_name)

    def fit(self, fn: Callable, *, bound_s: Optional[float] = None, **kwargs):
        """Run ``fn`` on the backend under test; return the trainkit ``Result`` (or raise).

        The fit must end within ``bound_s`` (default: the case's bound); past it the backend's Ray
        job is torn down and ``CaseTimeout`` is raised.
        """
        from trainkit_testing.cluster import needs_ray

        trainer = self.trainer(fn, **kwargs)  # num_workers=0: the backend's local mode if it has one
        bound = _Bound(bound_s or self.bound_s, needs_ray(self.backend))
        with bound:
            try:
                result = trainer.fit()
            except Exception as e:
                if bound.fired:
                    raise CaseTimeout(bound.bound_s, bound.killed) from e
                raise
        if bound.fired:
            raise CaseTimeout(bound.bound_s, bound.killed)
        return result

    def storage_for(self, kind: str) -> str:
        """A storage_path of the given kind: ``local`` (this case's folder) or ``s3`` (a fresh moto bucket)."""
        import pytest

        if kind == "local":
            return self.storage
        if self.s3 is None:
            pytest.skip("missing moto: S3 cases need the moto server (pip install 'trainkit[test]')")
        return f"s3://{self.s3.create_bucket('tkconf')}/runs"

    def fs_for(self, storage_path: str):
        """(fsspec filesystem, path without scheme) of a storage path."""
        import fsspec

        if storage_path.startswith("s3://"):
            return self.s3.filesystem(), storage_path[len("s3://"):]
        return fsspec.filesystem("file"), storage_path

    def fails(self, fn: Callable, **kwargs):
        """Run ``fn``; it must fail. Returns the ``TrainingFailedError`` that ``fit()`` raised
        (``CaseTimeout`` is not one: a hung backend fails the case)."""
        from trainkit import TrainingFailedError

        try:
            result = self.fit(fn, **kwargs)
        except TrainingFailedError as e:
            return e
        raise AssertionError(f"fit() returned {result!r}; expected it to raise TrainingFailedError")

    def result_from_path(self, path: str):
        """``Result.from_path(path)`` as the backend reads its own run folders (``ray_train``: Ray
        Train's snapshot, converted), else trainkit's."""
        import trainkit

        reader = getattr(self.backend, "result_from_path", None)
        return reader(str(path)) if reader is not None else trainkit.Result.from_path(str(path))

    def run_path(self, name: str, storage_path: Optional[str] = None) -> str:
        """The run folder of run ``name`` under ``storage_path`` (default: this case's local folder), as
        a user names it: a local path, or a URI (``s3://bucket/runs/name``) on an object store."""
        if storage_path is None:
            return os.path.join(self.storage, name)
        if "://" in storage_path:
            return f"{storage_path.rstrip('/')}/{name}"
        return os.path.join(storage_path, name)

    def uri_of(self, storage_path: str, path: str) -> str:
        """``path`` (a ``Result``'s or ``Checkpoint``'s, which on an object store has no scheme, as in
        Ray Train) as a URI of ``storage_path``'s kind, for ``Result.from_path``; local paths stay."""
        path = str(path)
        if "://" in storage_path and "://" not in path:
            return f"{storage_path.split('://', 1)[0]}://{path.lstrip('/')}"
        return path

    def read(self, rel: str) -> Any:
        with open(os.path.join(self.dir, rel)) as f:
            return json.load(f)

    def read_all(self, prefix: str) -> dict[str, Any]:
        """Every JSON file under ``dir`` whose name starts with ``prefix``: name -> value."""
        out = {}
        for n in sorted(os.listdir(self.dir)):
            if n.startswith(prefix) and ".tmp" not in n:  # put()'s temp files are not values yet
                out[n] = self.read(n)
        return out

    def lines(self, rel: str) -> list[str]:
        p = os.path.join(self.dir, rel)
        if not os.path.exists(p):
            return []
        with open(p) as f:
            return [line.rstrip("\n") for line in f if line.strip()]


# -- helpers used inside training functions (they run in workers) ------------------------------
def put(folder: str, rel: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``folder/rel`` atomically (readers never see half a file)."""
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.{uuid.uuid4().hex[:6]}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def append(folder: str, rel: str, line: str) -> None:
    with open(os.path.join(folder, rel), "a") as f:
        f.write(line + "\n")


def count_attempt(folder: str, rank: int) -> int:
    """Count this rank's starts in ``folder`` (one line per start); the attempt number, 1-based.

    A marker file works on every backend, Ray Train included (it has no attempt counter).
    """
    path = os.path.join(folder, f"starts-rank{rank}")
    with open(path, "a") as f:
        f.write("x\n")
    with open(path) as f:
        return sum(1 for _ in f)


def checkpoint_with(files: dict):
    """A trainkit ``Checkpoint`` of a fresh temp folder holding ``files`` (name -> JSON value)."""
    from trainkit import Checkpoint

    d = tempfile.mkdtemp(prefix="tkconf-ckpt-")
    for n, v in files.items():
        with open(os.path.join(d, n), "w") as f:
            json.dump(v, f)
    return Checkpoint.from_directory(d)


def checkpoint_files(ckpt) -> dict:
    """name -> JSON value of the files of a checkpoint (hidden files left out)."""
    if ckpt is None:
        return {}
    out = {}
    with ckpt.as_directory() as d:
        for n in sorted(os.listdir(d)):
            if n.startswith("."):
                continue
            with open(os.path.join(d, n)) as f:
                try:
                    out[n] = json.load(f)
                except ValueError:
                    out[n] = None
    return out


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until truthy; raise ``TimeoutError`` naming ``what`` at the deadline."""
    return _poll(predicate, timeout_s, what, interval_s=0.02, error=TimeoutError)


def resume_step() -> int:
    """The ``step`` stored in ``get_checkpoint()`` (0 when there is none)."""
    import trainkit

    return int(checkpoint_files(trainkit.get_checkpoint()).get("step", 0))
