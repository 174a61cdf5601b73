"""The fake cluster: a real local Ray (``ray.cluster_utils.Cluster``) with M virtual nodes, one per test run.

Shape: a head node with no CPUs (the controller actor needs none, and runs there next to
the driver) and M worker nodes of C logical CPUs each. GCS health checks are tightened
(0.5 s period, 2 misses) so a killed node is noticed in about a second. Every Ray
process gets a private ``RAY_TMPDIR`` so this cluster never joins, or is joined by, the
other Ray clusters on the machine; the same marker finds its processes at the end.

Under pytest-xdist the workers SHARE one cluster: the first worker that needs it starts
it (under a file lock in ``/tmp/tkx-<testrunuid>/``), the others connect to its address
and pass their environment (the moto endpoint) through the job's ``runtime_env``. The
starting worker shuts it down only once every user has left. Each xdist worker is its
own Ray driver with its own controller and warm worker groups, so the cluster is sized
for ``workercount`` concurrent fits.

Runs in the pytest process (and each xdist worker). Ray is imported inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

# Fast failure detection for the fake cluster (read by GCS and raylets when they start).
FAST_FAILURE_ENV = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "2",
    "RAY_health_check_timeout_ms": "500",
}
# Starting many Ray processes at once on a small, busy machine (CI, pytest -n) can take longer
# than Ray's default 30 s wait for the GCS port: wait longer rather than fail the session.
SLOW_START_ENV = {"RAY_gcs_server_port_wait_time_s": "120"}
_HEAD_ARGS = {"num_cpus": 0, "include_dashboard": False}
_SHARED_WAIT_S = 3600  # how long the starting xdist worker waits for the others before stopping the cluster


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
    _cluster: object = field(default=None, repr=False)
    _coord_dir: Optional[str] = field(default=None, repr=False)
    _user: str = field(default="", repr=False)
    _saved_env: dict = field(default_factory=dict, repr=False)

    def node_ids(self) -> list[str]:
        """The ids of the live virtual nodes (the head, which has no CPUs, excluded)."""
        import ray

        return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command) of the live processes of this cluster (found by its private RAY_TMPDIR)."""
        return processes_with_env(f"RAY_TMPDIR={self.ray_tmpdir}")


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


def _set_env(env: dict) -> dict:
    saved = {k: os.environ.get(k) for k in (*env, "RAY_ADDRESS")}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    return saved


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _start_ray_cluster(plan: ClusterPlan, env: dict):
    """Start head + virtual nodes with ``env`` in os.environ (inherited by every Ray process)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(_HEAD_ARGS), shutdown_at_exit=True)
    try:
        for _ in range(plan.nodes):
            cluster.add_node(num_cpus=plan.cpus_per_node, wait=False)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def start(plan: ClusterPlan, env: dict) -> FakeCluster:
    """Start a cluster private to this process and connect this process to it as the driver."""
    import ray

    ray_tmpdir = tempfile.mkdtemp(prefix="tkp-", dir="/tmp")  # short: Ray's socket paths must fit
    saved = _set_env(dict(env, **FAST_FAILURE_ENV, **SLOW_START_ENV, RAY_TMPDIR=ray_tmpdir))
    if ray.is_initialized():
        ray.shutdown()
    try:
        cluster = _start_ray_cluster(plan, env)
        ray.init(address=cluster.address, log_to_driver=True)
    except BaseException:
        _restore_env(saved)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        raise
    return FakeCluster(cluster.address, ray_tmpdir, plan.nodes, plan.cpus_per_node,
                       _cluster=cluster, _saved_env=saved)


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
    saved = _set_env(dict(env, RAY_TMPDIR=info["ray_tmpdir"]))
    if ray.is_initialized():
        ray.shutdown()
    # The cluster's processes inherited the starting worker's environment, not ours: our
    # variables (the moto endpoint) reach the controller and the ranks through the job's runtime_env.
    ray.init(address=info["address"], log_to_driver=True, runtime_env={"env_vars": dict(env)} if env else None)
    return FakeCluster(info["address"], info["ray_tmpdir"], info["nodes"], info["cpus_per_node"], shared=True,
                       owner=False, _coord_dir=coord, _user=worker_id, _saved_env=saved)


def stop(handle: FakeCluster, leftover_timeout_s: float = 30.0) -> list[tuple[int, str]]:
    """Release warm workers, disconnect, and (if this process started it) stop the cluster.

    Returns the processes of the cluster that were still alive after ``leftover_timeout_s``
    (they were then killed); an empty list is the normal outcome.
    """
    import ray

    try:
        from trainkit.backends.ray import release_warm_workers

        release_warm_workers()
    finally:
        ray.shutdown()
    if handle._coord_dir:
        _leave_shared(handle)
    left: list = []
    if handle.owner and handle._cluster is not None:
        handle._cluster.shutdown()
        deadline = time.monotonic() + leftover_timeout_s
        left = handle.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = handle.processes()
        for pid, _cmd in left:  # ours beyond doubt: they carry this cluster's private RAY_TMPDIR
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(handle.ray_tmpdir, ignore_errors=True)
    _restore_env(handle._saved_env)
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
