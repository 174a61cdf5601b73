"""Private local Ray clusters with virtual nodes: the one way this repository starts a Ray for tests and scenarios.

``Cluster`` is a real local Ray (``ray.cluster_utils.Cluster``) with this process as its
driver: a head node (no CPUs by default: the driver and the controller actor, which needs
none, run there) and N virtual nodes of C logical CPUs. Every Ray process of it gets a
private ``RAY_TMPDIR`` so that it never joins, or is joined by, the other Ray clusters on
the machine; the same marker finds its processes at the end, and any left after the
shutdown are killed. GCS health checks are tightened (0.5 s period, 2 misses) so a killed
node is noticed in about a second. The chaos runner, the conformance suite, the
``trainkit_cluster`` fixture and trainkit's own tests all start their Ray with it.

The pytest session's fake cluster (``start`` / ``acquire_shared`` / ``stop``, the handle
``FakeCluster``): under pytest-xdist the workers SHARE one cluster: the first worker that
needs it starts it (under a file lock in ``/tmp/tkx-<testrunuid>/``), the others connect
to its address and pass their environment (the moto endpoint) through the job's
``runtime_env``. The starting worker shuts it down only once every user has left. Each
xdist worker is its own Ray driver with its own controller and warm worker groups, so the
cluster is sized for ``workercount`` concurrent fits.

Runs in the pytest process (and each xdist worker) or the chaos driver. Ray is imported
inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from trainkit_testing.environ import Environ

# Fast failure detection for the fake cluster (read by GCS and raylets when they start).
FAST_FAILURE_ENV = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "2",
    "RAY_health_check_timeout_ms": "500",
}
# Starting many Ray processes at once on a small, busy machine (CI, pytest -n) can take longer
# than Ray's default 30 s wait for the GCS port: wait longer rather than fail the session.
SLOW_START_ENV = {"RAY_gcs_server_port_wait_time_s": "120"}
# A test cluster is local and lives for one session: no token auth. Ray 2.60 turns token auth on for a
# new local cluster and each process looks for the token on its own ($HOME/.ray/auth_token, cached per
# process), so a process whose HOME or RAY_AUTH_MODE differs at that moment (pytester moves HOME; an
# earlier private cluster set RAY_AUTH_MODE=token) cannot join the session's cluster: InvalidAuthToken,
# measured on a CI run. Starter and joiners say the same thing explicitly instead.
AUTH_ENV = {"RAY_AUTH_MODE": "disabled"}
_SHARED_WAIT_S = 3600  # how long the starting xdist worker waits for the others before stopping the cluster


def needs_ray(backend: Any) -> bool:
    """Whether ``backend`` (a backend object, or the name it is registered under) runs on a Ray cluster.

    It is the backend's own ``needs_ray`` trait (``trainkit.backends.api.Backend``); a backend
    that does not declare it needs none, as ``handles_local_mode`` defaults to false.

    >>> needs_ray("ray"), needs_ray("local")  # doctest: +SKIP
    (True, False)
    """
    if isinstance(backend, str):
        from trainkit.backends.api import get_backend

        backend = get_backend(backend)
    return bool(getattr(backend, "needs_ray", False))


def disconnect() -> None:
    """Release this driver's warm rank workers and disconnect it from Ray; the cluster itself stays up."""
    import ray

    try:
        from trainkit.backends.ray import release_warm_workers

        release_warm_workers()
    finally:
        ray.shutdown()


class Cluster:
    """A private local Ray cluster, with this process connected to it as the driver until ``stop()``.

    ``nodes`` virtual nodes of ``cpus_per_node`` logical CPUs (``node_resources[i]``: the
    custom resources of node i) beside a head node of ``head_cpus`` CPUs. ``env`` is put
    into ``os.environ`` before Ray starts, so that every Ray process inherits it, and taken
    out again by ``stop()``. A Ray this process was connected to is disconnected first.
    ``ray_cluster`` (the ``ray.cluster_utils.Cluster``) and ``virtual_nodes`` are what
    removes and adds nodes (``fault_injection.NodeBroker`` takes them).

    >>> with Cluster(nodes=3, cpus_per_node=1) as cluster:  # doctest: +SKIP
    ...     cluster.ray_cluster.remove_node(cluster.virtual_nodes[2])
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, *, head_cpus: int = 0,
                 head_resources: Optional[dict] = None, node_resources: Sequence[dict] = (),
                 env: Optional[dict] = None, fast_failure: bool = True, log_to_driver: bool = True,
                 tmp_prefix: str = "tkp-"):
        if node_resources and len(node_resources) != nodes:
            raise ValueError(f"Cluster(node_resources=...) has {len(node_resources)} entries for {nodes} nodes; "
                             "give one mapping per virtual node")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.head_cpus = head_cpus
        self.head_resources = dict(head_resources or {})
        self.node_resources = [dict(r) for r in node_resources] or [{} for _ in range(nodes)]
        self.env = dict(env or {})
        self.fast_failure = fast_failure
        self.log_to_driver = log_to_driver
        self.tmp_prefix = tmp_prefix
        self.address = ""
        self.ray_tmpdir = ""
        self.ray_cluster: Any = None  # ray.cluster_utils.Cluster, once started
        self.virtual_nodes: list = []  # its node handles, in order: node i has node_resources[i]
        self._environ = Environ()

    def start(self) -> "Cluster":
        """Start the head and the virtual nodes, wait for them, and connect this process as the driver."""
        import ray
        from ray.cluster_utils import Cluster as RayCluster

        if ray.is_initialized():
            disconnect()
        self.ray_tmpdir = tempfile.mkdtemp(prefix=self.tmp_prefix, dir="/tmp")  # short: Ray's socket paths must fit
        self._environ.set({**self.env, **(FAST_FAILURE_ENV if self.fast_failure else {}), **SLOW_START_ENV,
                           **AUTH_ENV, "RAY_TMPDIR": self.ray_tmpdir})
        self._environ.pop("RAY_ADDRESS")
        head = {"num_cpus": self.head_cpus, "include_dashboard": False}
        if self.head_resources:
            head["resources"] = self.head_resources
        try:
            self.ray_cluster = RayCluster(initialize_head=True, head_node_args=head, shutdown_at_exit=True)
            for resources in self.node_resources:
                node_args = {"resources": resources} if resources else {}
                self.virtual_nodes.append(self.ray_cluster.add_node(num_cpus=self.cpus_per_node, wait=False,
                                                                    **node_args))
            self.ray_cluster.wait_for_nodes()
            ray.init(address=self.ray_cluster.address, log_to_driver=self.log_to_driver)
        except BaseException:
            self.shutdown(leftover_timeout_s=0)
            raise
        self.address = self.ray_cluster.address
        return self

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command) of the live processes of this cluster (found by its private RAY_TMPDIR)."""
        return processes_with_env(f"RAY_TMPDIR={self.ray_tmpdir}") if self.ray_tmpdir else []

    def stop(self, leftover_timeout_s: float = 30.0) -> list[tuple[int, str]]:
        """Release warm workers, disconnect, and shut the cluster down (``shutdown``)."""
        try:
            disconnect()
        finally:
            left = self.shutdown(leftover_timeout_s)
        return left

    def shutdown(self, leftover_timeout_s: float = 30.0) -> list[tuple[int, str]]:
        """Stop every process of the cluster, remove its RAY_TMPDIR and put ``os.environ`` back.

        Returns the processes of the cluster that were still alive after ``leftover_timeout_s``
        (they were then killed); an empty list is the normal outcome.
        """
        left: list = []
        if self.ray_cluster is not None:
            self.ray_cluster.shutdown()
            self.ray_cluster = None
            self.virtual_nodes = []
            deadline = time.monotonic() + leftover_timeout_s
            left = self.processes()
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = self.processes()
            for pid, _cmd in left:  # ours beyond doubt: they carry this cluster's private RAY_TMPDIR
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.ray_tmpdir:
            shutil.rmtree(self.ray_tmpdir, ignore_errors=True)
        self._environ.restore()
        return left

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def processes_with_env(marker: str) -> list[tuple[int, str]]:
    """Live (not zombie) processes whose environment holds ``marker`` (``NAME=value``)."""
    needle = marker.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if state not in ("Z", "X"):
            found.append((int(entry), cmd))
    return found


# -- the pytest session's fake cluster --------------------------------------------------------------

@dataclass(frozen=True)
class ClusterPlan:
    """What the session needs, computed from the collected tests."""

    nodes: int = 2
    cpus_per_node: int = 2
    needs_s3: bool = False


@dataclass
class FakeCluster:
    """Handle of the session's fake cluster (what the ``trainkit_cluster`` fixture gives).

    >>> def test_shape(trainkit_cluster):  # doctest: +SKIP
    ...     assert trainkit_cluster.nodes == 2
    """

    address: str
    ray_tmpdir: str
    nodes: int
    cpus_per_node: int
    shared: bool = False  # joined a cluster another xdist worker started
    owner: bool = True  # this process started it and stops it
    _cluster: Optional[Cluster] = field(default=None, repr=False)
    _coord_dir: Optional[str] = field(default=None, repr=False)
    _user: str = field(default="", repr=False)
    _environ: Environ = field(default_factory=Environ, repr=False)  # a joining worker's changes to os.environ
    _runtime_env: Optional[dict] = field(default=None, repr=False)

    def node_ids(self) -> list[str]:
        """The ids of the live virtual nodes (the head, which has no CPUs, excluded)."""
        import ray

        return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command) of the live processes of this cluster (found by its private RAY_TMPDIR)."""
        return processes_with_env(f"RAY_TMPDIR={self.ray_tmpdir}")

    def connect(self) -> None:
        """Connect this process to the cluster as its driver, unless it is connected to a Ray already.

        For a test that ran on a ``Cluster`` of its own (which disconnected this process):

        >>> trainkit_cluster.connect()  # doctest: +SKIP
        """
        import ray

        if not ray.is_initialized():
            self._environ.set(AUTH_ENV)
            ray.init(address=self.address, log_to_driver=True, runtime_env=self._runtime_env)


def start(plan: ClusterPlan, env: dict) -> FakeCluster:
    """Start a cluster private to this process and connect this process to it as the driver."""
    cluster = Cluster(plan.nodes, plan.cpus_per_node, env=env).start()
    return FakeCluster(cluster.address, cluster.ray_tmpdir, plan.nodes, plan.cpus_per_node, _cluster=cluster)


def acquire_shared(plan: ClusterPlan, env: dict, testrunuid: str, worker_id: str) -> FakeCluster:
    """Join the xdist run's shared cluster, starting it if this worker is the first to need it."""
    import ray
    from filelock import FileLock

    coord = os.path.join("/tmp", f"tkx-{testrunuid[:16]}")
    os.makedirs(os.path.join(coord, "users"), exist_ok=True)
    info_path = os.path.join(coord, "cluster.json")
    with FileLock(os.path.join(coord, "lock")):
        info = json.load(open(info_path)) if os.path.exists(info_path) else None
        if info is None or info.get("closed"):
            handle = start(plan, env)
            info = {"address": handle.address, "ray_tmpdir": handle.ray_tmpdir, "owner_pid": os.getpid(),
                    "nodes": plan.nodes, "cpus_per_node": plan.cpus_per_node}
            with open(info_path + ".tmp", "w") as f:
                json.dump(info, f)
            os.replace(info_path + ".tmp", info_path)
            handle._coord_dir, handle._user = coord, worker_id
            open(os.path.join(coord, "users", worker_id), "w").close()
            return handle
        open(os.path.join(coord, "users", worker_id), "w").close()
    # The cluster's processes inherited the starting worker's environment, not ours: our
    # variables (the moto endpoint) reach the controller and the ranks through the job's runtime_env.
    handle = FakeCluster(info["address"], info["ray_tmpdir"], info["nodes"], info["cpus_per_node"], shared=True,
                         owner=False, _coord_dir=coord, _user=worker_id,
                         _runtime_env={"env_vars": dict(env)} if env else None)
    handle._environ.set({**env, **AUTH_ENV}, RAY_TMPDIR=info["ray_tmpdir"])
    handle._environ.pop("RAY_ADDRESS")
    if ray.is_initialized():
        disconnect()
    handle.connect()
    return handle


def stop(handle: FakeCluster, leftover_timeout_s: float = 30.0) -> list[tuple[int, str]]:
    """Release warm workers, disconnect, and (if this process started it) stop the cluster.

    Returns the processes of the cluster that were still alive after ``leftover_timeout_s``
    (they were then killed); an empty list is the normal outcome.
    """
    disconnect()
    if handle._coord_dir:
        _leave_shared(handle)
    left = handle._cluster.shutdown(leftover_timeout_s) if handle.owner and handle._cluster is not None else []
    handle._environ.restore()
    return left


def _leave_shared(handle: FakeCluster) -> None:
    from filelock import FileLock

    users = os.path.join(handle._coord_dir, "users")
    lock = FileLock(os.path.join(handle._coord_dir, "lock"))
    with lock:
        try:
            os.remove(os.path.join(users, handle._user))
        except FileNotFoundError:
            pass
    if not handle.owner:
        return
    deadline = time.monotonic() + _SHARED_WAIT_S
    while time.monotonic() < deadline:
        with lock:
            if not os.listdir(users):
                info_path = os.path.join(handle._coord_dir, "cluster.json")
                with open(info_path) as f:
                    info = json.load(f)
                info["closed"] = True
                with open(info_path, "w") as f:
                    json.dump(info, f)
                return
        time.sleep(0.2)  # polling other processes' files; there is no event to wait on across processes
