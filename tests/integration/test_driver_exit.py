"""A driver that dies (SIGKILL) or is interrupted (Ctrl-C) leaves no worker behind.

The driver is a real subprocess connected to this test process's Ray; it runs a long fit
on 2 workers. The worker pids come from the run's ``attempt_started`` event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import psutil

from trainkit.events import read_run_dicts
from trainkit_testing.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(150)]

_DRIVER = textwrap.dedent("""
    import sys, time, ray, trainkit
    from trainkit import RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    def loop(config):
        for i in range(100000):
            time.sleep(0.05)
            trainkit.report({"i": i})

    ray.init(address=sys.argv[1])
    try:
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2),
                     run_config=RunConfig(name="driver", storage_path=sys.argv[2])).fit()
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.exit(130)
""")


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _worker_pids(run_path: str, deadline_s: float) -> list[int]:
    """The pids of the first attempt, once it has committed a report."""
    def pids():
        events = read_run_dicts(run_path)
        started = [e for e in events if e["type"] == "attempt_started" and e.get("ranks")]
        if started and any(e["type"] == "report_committed" for e in events):
            return [r["pid"] for r in started[0]["ranks"]]
        return None

    return wait_for(pids, deadline_s, f"a committed report in {run_path}", interval_s=0.1)


def _wait_dead(pids: list[int], deadline_s: float) -> list[int]:
    deadline = time.monotonic() + deadline_s
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def _start_driver(tmp_path) -> tuple[subprocess.Popen, str]:
    import ray

    storage = str(tmp_path / "runs")
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = dict(os.environ, TRAINKIT_PROGRESS="0", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), ray.get_runtime_context().gcs_address, storage],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, os.path.join(storage, "driver")


def test_a_sigkilled_driver_leaves_no_worker_behind(tmp_path):
    proc, run_path = _start_driver(tmp_path)
    try:
        pids = _worker_pids(run_path, 90)
        assert all(pid_alive(p) for p in pids)
        proc.kill()
        proc.wait(10)
        assert _wait_dead(pids, 30) == [], "workers outlived their driver"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_aborts_the_run_and_kills_its_workers(tmp_path):
    proc, run_path = _start_driver(tmp_path)
    try:
        pids = _worker_pids(run_path, 90)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "INTERRUPTED" in out, out[-2000:]
        assert _wait_dead(pids, 30) == [], "workers outlived the interrupted fit"
        with open(os.path.join(run_path, "run_state.json")) as f:
            assert json.load(f)["status"] == "aborted"
    finally:
        if proc.poll() is None:
            proc.kill()
