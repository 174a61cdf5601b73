"""Fits from several threads of one driver: one ``ray.init``, and a fit waits for the resources
that another fit holds instead of failing after the worker-start timeout.

The in-process test uses the session's cluster; the ``ray.init`` race needs a driver that has
not started Ray yet, so it runs as a real subprocess joining the same cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import trainkit
from trainkit import ControllerError, RunConfig, ScalingConfig
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(240)]


def _steps(config):
    for i in range(config["steps"]):
        time.sleep(config["step_s"])
        trainkit.report({"step": i + 1, "who": config["who"]})


def _fit_in_threads(storage_path: str, n: int, cpu_per_worker: float, timeout_s: float = 150) -> dict:
    results: dict = {}

    def one(i: int):
        try:
            trainer = TorchTrainer(_steps, train_loop_config={"steps": 3, "step_s": 1.5, "who": i},
                                   scaling_config=ScalingConfig(num_workers=2,
                                                                resources_per_worker={"CPU": cpu_per_worker}),
                                   run_config=RunConfig(name=f"fit{i}", storage_path=storage_path))
            results[i] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), f"a fit did not return within {timeout_s} s: {results}"
    return results


def test_fits_that_cannot_run_at_once_wait_for_each_other_and_all_finish(storage_path, monkeypatch, capfd):
    import ray

    # Each fit takes more than half of the cluster's CPUs, so no two run at once; a short
    # worker-start timeout shows that the wait for another fit's resources is not bounded by it.
    monkeypatch.setenv("TRAINKIT_WORKER_START_TIMEOUT_S", "8")
    monkeypatch.setenv("TRAINKIT_PROGRESS", "auto")
    total = ray.cluster_resources()["CPU"]
    t0 = time.monotonic()
    results = _fit_in_threads(storage_path, 3, cpu_per_worker=total * 0.3)
    assert time.monotonic() - t0 > 3 * 3 * 1.5  # one after the other: the last waited > 8 s
    errors = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    assert errors == {}, errors
    for i, r in results.items():
        assert r.metrics == {"step": 3, "who": i}
    assert "waiting for" in capfd.readouterr().err  # what a fit waits for is said


def test_a_fit_that_can_never_be_placed_still_fails_at_once(storage_path):
    import ray

    total = ray.cluster_resources()["CPU"]
    t0 = time.monotonic()
    with pytest.raises(ControllerError, match="can never hold"):
        TorchTrainer(_steps, train_loop_config={"steps": 1, "step_s": 0, "who": 0},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": total}),
                     run_config=RunConfig(name="never", storage_path=storage_path)).fit()
    assert time.monotonic() - t0 < 20


_DRIVER = textwrap.dedent("""
    import sys, threading, ray, trainkit
    from trainkit import RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    def loop():
        trainkit.report({"step": 1})

    out, errors = {}, []
    def one(i):
        try:
            out[i] = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                                  run_config=RunConfig(name=f"t{i}", storage_path=sys.argv[1])).fit().metrics
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    print("RESULTS", sorted(out.items()), "ERRORS", errors, "SESSIONS", ray.get_runtime_context().get_job_id(),
          flush=True)
    sys.exit(0 if len(out) == 3 else 1)
""")


def test_three_threads_fitting_before_ray_is_started_share_one_ray_init(tmp_path):
    import ray

    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = dict(os.environ, TRAINKIT_PROGRESS="0", PYTHONPATH=os.getcwd(),
               RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS"))
    assert "ERRORS []" in line, line
    assert line.count("{'step': 1}") == 3, line
