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
import time
import uuid
from typing import Any, Callable, Iterator, Optional

RAY_CPUS = 3  # logical CPUs of the private Ray's one node (the elastic cases read the capacity from Ray)


def resolve_backend(name: str):
    """The backend object for ``name`` (registered name or ``module:attr``)."""
    import conformance.broken  # noqa: F401 - registers the suite's broken-* self-test backends
    from trainkit.backends.api import available_backends, get_backend, register_backend

    if ":" in name and name not in available_backends():
        register_backend(name, name)  # so that TorchTrainer(backend=name) finds it too
    return get_backend(name)


@contextlib.contextmanager
def ray_for(backend: Any) -> Iterator[None]:
    """A private local Ray (one node of ``RAY_CPUS`` CPUs) for the block, when ``backend`` needs Ray.

    A Ray this process is already connected to (the plugin's cluster fixture, a test's) is
    used as it is; a backend whose ``needs_ray`` trait is false gets none.
    """
    from trainkit_testing.cluster import Cluster, needs_ray

    if needs_ray(backend):
        import ray

        if not ray.is_initialized():
            with Cluster(nodes=0, head_cpus=RAY_CPUS, env={"TRAINKIT_PROGRESS": "0"}, fast_failure=False,
                         log_to_driver=False, tmp_prefix="tkconf-"):
                yield
            return
    yield


class Harness:
    """One case's view of the backend: ``fit``, ``fails`` and a private folder.

    >>> result = tk.fit(train_fn, workers=2, config={"dir": tk.dir})  # doctest: +SKIP
    """

    def __init__(self, backend_name: str, backend: Any, base: str):
        self.backend_name = backend_name
        self.backend = backend
        self.base = base
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
                hang_config: Any = None, storage_path: Optional[str] = None):
        import trainkit
        from trainkit.torch import TorchTrainer

        rc = trainkit.RunConfig(name=name or self.new_name(), storage_path=storage_path or self.storage,
                                failure_config=trainkit.FailureConfig(max_failures=max_failures),
                                checkpoint_config=checkpoint_config, hang_config=hang_config)
        return TorchTrainer(fn, train_loop_config=config, scaling_config=trainkit.ScalingConfig(num_workers=workers),
                            run_config=rc, datasets=datasets, backend=self.backend_name)

    def fit(self, fn: Callable, **kwargs):
        """Run ``fn`` on the backend under test; return the trainkit ``Result`` (or raise)."""
        return self.trainer(fn, **kwargs).fit()  # num_workers=0: the backend's local mode if it has one

    def fails(self, fn: Callable, **kwargs):
        """Run ``fn``; it must fail. Returns the ``TrainingFailedError`` that ``fit()`` raised."""
        from trainkit import TrainingFailedError

        try:
            result = self.fit(fn, **kwargs)
        except TrainingFailedError as e:
            return e
        raise AssertionError(f"fit() returned {result!r}; expected it to raise TrainingFailedError")

    def run_path(self, name: str) -> str:
        return os.path.join(self.storage, name)

    def read(self, rel: str) -> Any:
        with open(os.path.join(self.dir, rel)) as f:
            return json.load(f)

    def read_all(self, prefix: str) -> dict[str, Any]:
        """Every JSON file under ``dir`` whose name starts with ``prefix``: name -> value."""
        out = {}
        for n in sorted(os.listdir(self.dir)):
            if n.startswith(prefix):
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
    """Poll ``predicate`` until truthy; raise naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def resume_step() -> int:
    """The ``step`` stored in ``get_checkpoint()`` (0 when there is none)."""
    import trainkit

    return int(checkpoint_files(trainkit.get_checkpoint()).get("step", 0))
