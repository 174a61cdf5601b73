"""The plugin's fixtures (registered by ``trainkit_testing.plugin``).

==================  ========  ==============================================================
fixture             scope     gives
==================  ========  ==============================================================
trainkit_cluster    session   ``FakeCluster``: a real local Ray with M virtual nodes
trainkit_settings   function  the ``Settings`` in force (options + ``trainkit`` marker)
trainkit_workers    function  N, the ranks per fit (0 under ``--trainkit-backend=local``)
scaling_config      function  ``ScalingConfig`` for N ranks, spread over the virtual nodes
run_training        function  ``run_training(train_fn, config=None, *, scaling=None, storage=None,
                              run_config=None, datasets=None) -> Result``
local_training      function  the same in this process (``num_workers=0``), no Ray
tmp_storage         function  a fresh local storage_path for the test's runs
s3_storage          function  ``S3Storage``: a fresh moto bucket, its ``s3://`` path and fs
fake_rows           function  ``fake_rows(n, seed=...)``: seeded faker rows with an ``id``
==================  ========  ==============================================================

Run folders: every fit of a test goes to its own folder under the test's storage; the
folders of a passing test are deleted unless ``--trainkit-keep-runs``; a failing test's
are kept and named in its "trainkit run" report section. Runs in the pytest process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

import pytest

from trainkit_testing.cluster import ClusterPlan, needs_ray
from trainkit_testing.settings import FAILED_KEY, RUNS_KEY, SETTINGS_KEY, Settings

PLAN_KEY = pytest.StashKey[ClusterPlan]()


# -- planning (at collection) --------------------------------------------------------------------

def _on_cluster(backend: str) -> bool:
    """Whether ``run_training`` on ``backend`` runs on the session's fake Ray cluster (the backend's ``needs_ray``)."""
    try:
        return needs_ray(backend)
    except (ValueError, ImportError):  # a backend that cannot be loaded: its fit() says so, in the test
        return False


def plan_cluster(config: pytest.Config, per_item: list) -> ClusterPlan:
    """Size the session's cluster for the largest test that will use it; remember whether S3 is needed.

    Nodes: the most any test asks for. CPUs per node: the most workers any test asks for
    (so a one-node test can pack all its ranks on one node), times the number of xdist
    workers sharing the cluster.
    """
    on_cluster = {b for b in {s.backend for _, s in per_item} if _on_cluster(b)}
    users = [(item, s) for item, s in per_item
             if "trainkit_cluster" in getattr(item, "fixturenames", ())
             or ("run_training" in getattr(item, "fixturenames", ()) and s.backend in on_cluster)]
    base: Settings = config.stash[SETTINGS_KEY]
    nodes = max([s.nodes for _, s in users] or [base.nodes])
    workers = max([s.workers for _, s in users] or [base.workers])
    share = int(getattr(config, "workerinput", {}).get("workercount", 1) or 1)
    plan = ClusterPlan(nodes=nodes, cpus_per_node=workers * share,
                       needs_s3=any("s3_storage" in getattr(item, "fixturenames", ()) for item, _ in users))
    config.stash[PLAN_KEY] = plan
    return plan


def _safe_name(nodeid: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::")[-1]).strip("_.")[:60] or "test"
    return f"{name}-{hashlib.sha1(nodeid.encode()).hexdigest()[:6]}"


# -- session resources -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def trainkit_s3_server():
    """The session's moto S3 server (``MotoS3``) on 127.0.0.1; most tests want ``s3_storage`` instead."""
    from trainkit_testing.s3 import MotoS3

    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def trainkit_cluster(request: pytest.FixtureRequest):
    """A real local Ray cluster with M virtual nodes, started once and connected to as this process's driver.

    The head node has no CPUs; each virtual node has enough logical CPUs for the largest
    test of the session. Warm rank workers stay up between fits of the same shape. At the
    end the warm workers are released, Ray is shut down, and no process of the cluster is
    left (a leftover is killed and reported as a teardown error).

    >>> def test_nodes(trainkit_cluster):  # doctest: +SKIP
    ...     assert len(trainkit_cluster.node_ids()) == trainkit_cluster.nodes
    """
    from trainkit_testing import cluster as cl

    config = request.config
    plan = config.stash.get(PLAN_KEY, None) or ClusterPlan()
    env = {"TRAINKIT_PROGRESS": "0"}
    if plan.needs_s3:
        # Before Ray starts: every Ray process inherits the moto endpoint and credentials.
        env.update(request.getfixturevalue("trainkit_s3_server").env)
    workerinput = getattr(config, "workerinput", None)
    if workerinput and int(workerinput.get("workercount", 1)) > 1:
        handle = cl.acquire_shared(plan, env, workerinput["testrunuid"], workerinput["workerid"])
    else:
        handle = cl.start(plan, env)
    try:
        yield handle
    finally:
        left = cl.stop(handle)
    if left:
        pytest.fail(f"trainkit_cluster: {len(left)} Ray process(es) outlived the cluster's shutdown and were "
                    f"killed: {left[:5]}", pytrace=False)


# -- per test ---------------------------------------------------------------------------------------

@pytest.fixture
def trainkit_settings(request: pytest.FixtureRequest) -> Settings:
    """The settings in force for this test: command line / ini, overridden by ``@pytest.mark.trainkit``."""
    from trainkit_testing.settings import item_settings

    return item_settings(request.node)


@pytest.fixture
def trainkit_workers(trainkit_settings: Settings) -> int:
    """N, the ranks per fit for this test (``--trainkit-workers`` or the marker); 0 for the local backend.

    >>> def test_world(run_training, trainkit_workers):  # doctest: +SKIP
    ...     assert run_training(fn).metrics["world_size"] == trainkit_workers
    """
    return 0 if trainkit_settings.local else trainkit_settings.workers


@pytest.fixture
def scaling_config(trainkit_settings: Settings, trainkit_workers: int):
    """A ``ScalingConfig`` for N ranks; with several virtual nodes the ranks are SPREAD across them."""
    from trainkit import ScalingConfig

    strategy = "SPREAD" if trainkit_settings.nodes > 1 else "PACK"
    return ScalingConfig(num_workers=trainkit_workers, placement_strategy=strategy)


@pytest.fixture
def tmp_storage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh, absolute local storage_path for this test's runs.

    Deleted after a passing test unless ``--trainkit-keep-runs``; kept after a failure.
    """
    root = tmp_path_factory.getbasetemp() / "trainkit-runs"
    root.mkdir(exist_ok=True)
    path = tempfile.mkdtemp(prefix=_safe_name(request.node.nodeid) + "-", dir=root)
    yield path
    settings: Settings = request.config.stash[SETTINGS_KEY]
    if not settings.keep_runs and not request.node.stash.get(FAILED_KEY, False):
        shutil.rmtree(path, ignore_errors=True)


def _record_run(item: pytest.Item, run_config) -> None:
    """Remember the run folder on the test, before the fit: a hang or a crash still names it."""
    from trainkit.storage import RunStore

    try:
        uri = RunStore(run_config.storage_path, run_config.name, run_config.storage_filesystem).uri
    except Exception:  # noqa: BLE001 - an unreachable storage still deserves a line in the report
        uri = f"{run_config.storage_path.rstrip('/')}/{run_config.name}"
    runs = item.stash.setdefault(RUNS_KEY, [])
    if uri not in runs:
        runs.append(uri)


class TrainingRunner:
    """``run_training`` / ``local_training``: fit a training function the way the test is configured.

    Every call without an explicit ``RunConfig(name=...)`` gets a new run folder named
    after the test; ``storage`` (a path, ``s3_storage`` or ``tmp_storage``) replaces the
    run config's ``storage_path``. ``RunConfig(callbacks=[fault_plan])`` passes through.
    Raises what ``fit()`` raises (``TrainingFailedError`` on a failed run).
    """

    def __init__(self, item: pytest.Item, settings: Settings, default_scaling, local: bool):
        self._item = item
        self._settings = settings
        self._default_scaling = default_scaling
        self._local = local
        self._count = 0

    def _run_config(self, run_config, storage):
        from trainkit import HangConfig, RunConfig

        self._count += 1
        if run_config is None:
            run_config = RunConfig(name=f"{_safe_name(self._item.nodeid)}-run{self._count}")
        elif not isinstance(run_config, RunConfig):
            from trainkit.errors import ConfigError

            raise ConfigError("run_training(run_config=...)", run_config, "a trainkit.RunConfig or None")
        if storage is not None:
            run_config = dataclasses.replace(run_config, storage_path=os.fspath(storage))
        hang = run_config.hang_config
        if self._settings.hang_timeout_s and hang.action == "warn" and hang.dump == "auto" \
                and hang.timeout_s == self._settings.hang_timeout_s:
            # A test must not wait forever on a hang: --trainkit-hang-timeout fails the run (and so the test).
            run_config = dataclasses.replace(run_config, hang_config=HangConfig(timeout_s=hang.timeout_s,
                                                                                  action="fail"))
        return run_config

    def __call__(self, train_fn: Callable, config: Optional[dict] = None, *, scaling=None, storage=None,
                 run_config=None, datasets: Optional[dict] = None):
        from trainkit import DataParallelTrainer
        from trainkit.config import TorchConfig  # not trainkit.torch's: that imports torch, local mode must not

        rc = self._run_config(run_config, storage)
        if self._local:
            from trainkit import ScalingConfig

            scaling = ScalingConfig(num_workers=0)
        elif scaling is None:
            scaling = self._default_scaling
        trainer = DataParallelTrainer(train_fn, train_loop_config=config, scaling_config=scaling, run_config=rc,
                                      datasets=datasets, backend_config=TorchConfig(backend="gloo"),
                                      backend=self._settings.backend)
        _record_run(self._item, rc)
        return trainer.fit()


def _test_env(monkeypatch: pytest.MonkeyPatch, settings: Settings, storage: str) -> None:
    """Defaults that RunConfig/HangConfig read when the test builds its own configs."""
    monkeypatch.setenv("TRAINKIT_STORAGE_PATH", storage)
    monkeypatch.setenv("TRAINKIT_PROGRESS", "0")
    if settings.hang_timeout_s:
        monkeypatch.setenv("TRAINKIT_HANG_TIMEOUT_S", repr(settings.hang_timeout_s))


@pytest.fixture
def run_training(request: pytest.FixtureRequest, trainkit_settings: Settings, scaling_config, tmp_storage: str,
                 monkeypatch: pytest.MonkeyPatch) -> TrainingRunner:
    """Run a training function with N ranks on the session's cluster (or the backend in force).

    >>> def test_two_ranks_report_in_step(run_training):  # doctest: +SKIP
    ...     def train_fn(config):
    ...         for step in range(3):
    ...             trainkit.report({"step": step, "world_size": trainkit.get_context().get_world_size()})
    ...     result = run_training(train_fn)
    ...     assert result.metrics == {"step": 2, "world_size": 2}
    """
    _test_env(monkeypatch, trainkit_settings, tmp_storage)
    if _on_cluster(trainkit_settings.backend):
        request.getfixturevalue("trainkit_cluster")
    return TrainingRunner(request.node, trainkit_settings, scaling_config, local=trainkit_settings.local)


@pytest.fixture
def local_training(request: pytest.FixtureRequest, trainkit_settings: Settings, tmp_storage: str,
                   monkeypatch: pytest.MonkeyPatch) -> TrainingRunner:
    """Run a training function in this process (``num_workers=0``, local mode): no Ray, no torch.distributed.

    The full contract holds: checkpoints persist, a re-run with the same name resumes.

    >>> def test_loss_goes_down(local_training):  # doctest: +SKIP
    ...     assert local_training(train_fn, {"lr": 0.1}).metrics["loss"] < 0.5
    """
    _test_env(monkeypatch, trainkit_settings, tmp_storage)
    return TrainingRunner(request.node, dataclasses.replace(trainkit_settings, backend="local"), None, local=True)


@pytest.fixture
def s3_storage(request: pytest.FixtureRequest, trainkit_s3_server, monkeypatch: pytest.MonkeyPatch):
    """A fresh moto bucket: ``.path`` (``s3://<bucket>/runs``, a storage_path), ``.fs`` (s3fs), ``.bucket``.

    Credentials and endpoint are in this process's environment for the test and in every
    Ray process of ``trainkit_cluster`` (set before Ray starts, or through ``runtime_env``).

    >>> def test_checkpoints_in_s3(run_training, s3_storage):  # doctest: +SKIP
    ...     run_training(train_fn, storage=s3_storage)
    ...     assert any(p.endswith("run_state.json") for p in s3_storage.ls())
    """
    from trainkit_testing.s3 import S3Storage, clear_s3fs_cache, export_env

    export_env(trainkit_s3_server, monkeypatch)
    clear_s3fs_cache()  # no listing cached from another test's view of storage
    bucket = trainkit_s3_server.create_bucket()
    yield S3Storage(path=f"s3://{bucket}/runs", bucket=bucket, endpoint=trainkit_s3_server.endpoint,
                    fs=trainkit_s3_server.filesystem())
    clear_s3fs_cache()


class FakeRows:
    """``fake_rows(n, seed=None, fields=...)``: n synthetic tabular rows (dicts) with ``id`` 0..n-1.

    The same seed gives the same rows; the default seed is derived from the test's id, so
    a test sees the same data on every run and different tests see different data.
    """

    FIELDS = ("name", "email", "city", "age", "score", "label")

    def __init__(self, default_seed: int):
        self.default_seed = default_seed

    def __call__(self, n: int = 100, *, seed: Optional[int] = None, fields: tuple = FIELDS) -> list[dict]:
        from faker import Faker

        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            from trainkit.errors import ConfigError

            raise ConfigError("fake_rows(n)", n, "an int >= 0")
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            from trainkit.errors import ConfigError

            raise ConfigError("fake_rows(fields)", sorted(unknown), "names from " + ", ".join(self.FIELDS))
        fake = Faker()
        fake.seed_instance(self.default_seed if seed is None else seed)
        make = {
            "name": fake.name,
            "email": fake.email,
            "city": fake.city,
            "age": lambda: fake.random_int(18, 90),
            "score": lambda: round(fake.pyfloat(min_value=0, max_value=1), 6),
            "label": lambda: fake.random_int(0, 1),
        }
        return [{"id": i, **{f: make[f]() for f in fields}} for i in range(n)]


@pytest.fixture
def fake_rows(request: pytest.FixtureRequest) -> FakeRows:
    """Seeded synthetic rows for dataset tests: ``rows = fake_rows(64)``; ``rows[i]["id"] == i``.

    >>> def test_shards_cover_rows(run_training, fake_rows):  # doctest: +SKIP
    ...     result = run_training(train_fn, datasets={"train": fake_rows(64)})
    """
    seed = int(hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8], 16)
    return FakeRows(seed)


__all__ = ["trainkit_cluster", "trainkit_s3_server", "trainkit_settings", "trainkit_workers", "scaling_config",
           "tmp_storage", "run_training", "local_training", "s3_storage", "fake_rows", "TrainingRunner",
           "FakeRows", "plan_cluster", "PLAN_KEY"]
