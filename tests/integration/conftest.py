"""Fixtures for the integration tests that need a real Ray: one local Ray per test process.

``ray_session`` takes a moto S3 server and then starts ONE local Ray (``num_cpus=4``, no
dashboard) for the whole pytest session; under ``pytest -n N`` every xdist worker
process starts its own. The AWS variables and a private ``RAY_TMPDIR`` are put into
``os.environ`` *before* ``ray.init`` so that every Ray process (the controller actor,
the rank workers) inherits them and reaches the same moto server, and so that this
Ray never joins or collides with another Ray on the machine.

At session end it releases the warm worker groups, shuts Ray down, and fails the
session's last test (teardown error) if any ``ray::RankWorker`` process of *this* Ray
(recognised by its ``RAY_TMPDIR`` in ``/proc/<pid>/environ``) is still alive.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import pytest


_INIT_ARGS = dict(num_cpus=4, include_dashboard=False, log_to_driver=True)


@dataclass(frozen=True)
class RaySession:
    ray_tmpdir: str
    s3_endpoint: str
    aws_env: dict

    def ensure(self) -> None:
        """Start this session's Ray again if another module's fixture shut it down."""
        import ray

        if not ray.is_initialized():
            os.environ.update(self.aws_env, RAY_TMPDIR=self.ray_tmpdir)
            ray.init(**_INIT_ARGS)


def _proc_state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...) or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return data.rsplit(")", 1)[-1].split()[0] if ")" in data else None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie, not gone) process."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def ray_processes_of(ray_tmpdir: str, prefix: str = "ray::") -> list[tuple[int, str]]:
    """(pid, command) of live processes whose name starts with ``prefix`` and that belong to the
    Ray started with ``RAY_TMPDIR=ray_tmpdir`` (other sessions' Rays on this machine are ignored)."""
    marker = f"RAY_TMPDIR={ray_tmpdir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            if not cmd.startswith(prefix):
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if marker in env and pid_alive(pid):
            found.append((pid, cmd))
    return found


_AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture(scope="session")
def ray_session(request):
    """One moto S3 server and one local Ray (4 CPUs) for this test process; see the module doc.

    The moto server is the shared ``s3_server`` of tests/conftest.py when it exists (one server
    per process, so S3 tests of other files and the Ray processes agree on the endpoint);
    otherwise this fixture starts its own.
    """
    ray_tmpdir = tempfile.mkdtemp(prefix="tkray-", dir="/tmp")  # short: Ray's socket paths must fit
    server = None
    try:
        endpoint = request.getfixturevalue("s3_server")
    except pytest.FixtureLookupError:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    aws_env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    aws_env.update({k: os.environ[k] for k in _AWS_KEYS if os.environ.get(k)})
    aws_env.update(AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_S3=endpoint)
    env = dict(aws_env, RAY_TMPDIR=ray_tmpdir, TRAINKIT_PROGRESS="0")
    removed = ("RAY_ADDRESS", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
    saved = {k: os.environ.get(k) for k in (*env, *removed)}
    os.environ.update(env)
    for k in removed:
        os.environ.pop(k, None)

    import ray

    if ray.is_initialized():  # another fixture's Ray would not have our environment
        ray.shutdown()
    try:
        ray.init(**_INIT_ARGS)
        yield RaySession(ray_tmpdir=ray_tmpdir, s3_endpoint=endpoint, aws_env=aws_env)
    finally:
        try:
            from trainkit.backends.ray import release_warm_workers

            release_warm_workers()
        finally:
            ray.shutdown()
            if server is not None:
                server.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + 30
        left = ray_processes_of(ray_tmpdir, "ray::RankWorker")
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = ray_processes_of(ray_tmpdir, "ray::RankWorker")
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        assert not left, f"RankWorker processes left after ray.shutdown(): {left}"


@pytest.fixture
def ray_up(ray_session):
    """This session's Ray, running (re-started if a module-scoped cluster fixture shut it down)."""
    ray_session.ensure()
    return ray_session
