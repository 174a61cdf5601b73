"""Hot spares (``RunConfig(spare_workers=N)``, issue 17) on a real local Ray with real process groups.

A spare is a ``RankWorker`` started, placed and torch-imported in the background; a SIGKILLed
rank is replaced by it (no worker start), the survivor keeps its process, the process group
re-forms and the group restores from the latest committed checkpoint. Spares are refilled in
the background, count against resources, and a spare that cannot be placed never holds up the
run. Everything is checked in the run's ``events.jsonl``.

One Ray for the session (``ray_up``: the plugin's cluster, one node with room for four ranks).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time

import pytest

import trainkit
from trainkit import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from trainkit.events import read_run_dicts
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(180)]


def _of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def _wait_for_event(events_path: str, kind: str, timeout_s: float) -> None:
    """Inside a rank: until the run's event stream has an event of ``kind`` (a run that never gets
    one fails, with the reason)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(events_path) as f:
            if f'"type": "{kind}"' in f.read():
                return
        time.sleep(0.05)
    raise RuntimeError(f"no {kind} event within {timeout_s:.0f} s")


def _steps_fn(config):
    """Checkpointed steps; on attempt 1, once a spare is ready, rank 1 SIGKILLs itself after report k.
    Each rank first says whether ``tabnanny`` (which only this function imports) was imported
    before it ran: the spare imports what a running rank imported before it joins."""
    import sys

    ctx = trainkit.get_context()
    had = "tabnanny" in sys.modules
    import tabnanny  # noqa: F401

    if config.get("imports"):
        with open(os.path.join(config["imports"], f"a{ctx.get_attempt()}-r{ctx.get_world_rank()}"), "w") as f:
            json.dump(had, f)
    ck = trainkit.get_checkpoint()
    step = json.load(open(os.path.join(ck.path, "step.json"))) if ck else 0
    start = step
    while step < config["steps"]:
        step += 1
        with tempfile.TemporaryDirectory() as d:
            if ctx.get_world_rank() == 0:
                with open(os.path.join(d, "step.json"), "w") as f:
                    json.dump(step, f)
            trainkit.report({"step": step, "attempt": ctx.get_attempt()}, checkpoint=Checkpoint.from_directory(d))
        if ctx.get_attempt() == 1 and ctx.get_world_rank() == 1 and step == config["kill_after"]:
            _wait_for_event(config["events"], "spare_ready", 90)
            os.kill(os.getpid(), signal.SIGKILL)
    return {"start": start, "pid": os.getpid()}


def test_a_hot_spare_replaces_a_sigkilled_rank_and_the_run_ends_with_every_step_and_checkpoint(storage_path, tmp_path):
    k, steps = 2, 5
    run_path = os.path.join(storage_path, "spare")
    imports = tmp_path / "imports"
    imports.mkdir()
    result = TorchTrainer(
        _steps_fn, train_loop_config={"steps": steps, "kill_after": k, "events": os.path.join(run_path, "events.jsonl"),
                                      "imports": str(imports)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="spare", storage_path=storage_path, spare_workers=1,
                             failure_config=FailureConfig(max_failures=1))).fit()
    assert result.error is None
    assert result.return_value["start"] == k  # restored from the last checkpoint committed before the kill
    assert list(result.metrics_dataframe["step"]) == list(range(1, steps + 1))
    assert list(result.metrics_dataframe["attempt"]) == [1] * k + [2] * (steps - k)
    with result.checkpoint.as_directory() as d:
        assert json.load(open(os.path.join(d, "step.json"))) == steps

    events = read_run_dicts(run_path)
    commits = [(e["attempt"], e["index"], e["checkpoint"]) for e in _of_type(events, "report_committed")]
    assert commits == [(1 if i <= k else 2, i, f"checkpoint_{i}") for i in range(1, steps + 1)]
    started = {e["attempt"]: {r["world_rank"]: r["pid"] for r in e["ranks"]} for e in _of_type(events, "attempt_started")}
    ready = _of_type(events, "spare_ready")
    (used,) = _of_type(events, "spare_used")
    assert used["attempt"] == 1 and used["replaced_pid"] == started[1][1]
    # the spare is the new rank 1, and it is the process that was ready before the kill
    assert used["pid"] == started[2][1] == ready[0]["pid"] != started[1][1]
    assert started[2][0] == started[1][0]  # the survivor kept its process
    assert _of_type(events, "attempt_started")[-1]["start_index"] == k
    (failed,) = _of_type(events, "worker_failed")
    assert failed["failures"][0]["world_rank"] == 1 and failed["failures"][0]["kind"] == "died"
    # the used spare is replaced in the background by a new process
    order = [e["type"] for e in events]
    assert order.index("spare_used") < order.index("group_restarted") < order.index("attempt_started",
                                                                                   order.index("spare_used"))
    assert all(e["wanted"] == 1 for e in ready)
    # the spare had the function's own import before it ran as rank 1 (a rank started fresh had not)
    had = {name: json.load(open(imports / name)) for name in os.listdir(imports)}
    assert had["a2-r1"] is True and had["a1-r1"] is False, had


def _wait_unplaced_fn(config):
    """Rank 0 makes one report, then waits (outside any barrier) for a spare_unplaced event; then both finish."""
    trainkit.report({"step": 1})
    if trainkit.get_context().get_world_rank() == 0:
        _wait_for_event(config["events"], "spare_unplaced", 60)
    flag = trainkit.collective.broadcast_from_rank_zero(True)
    trainkit.report({"step": 2})
    return flag


def test_a_spare_that_cannot_be_placed_never_holds_up_the_run_and_is_said_in_events(storage_path):
    import ray

    from trainkit.backends.ray import release_warm_workers

    release_warm_workers()  # this driver's warm groups would hold CPUs
    cpus = int(ray.cluster_resources().get("CPU", 0))
    spares = cpus - 2 + 1  # one more than fits beside the 2 ranks
    run_path = os.path.join(storage_path, "unplaced")
    try:
        result = TorchTrainer(
            _wait_unplaced_fn, train_loop_config={"events": os.path.join(run_path, "events.jsonl")},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name="unplaced", storage_path=storage_path, spare_workers=spares)).fit()
    finally:
        release_warm_workers()  # the pending spare's placement group goes with the group
    assert result.error is None and result.return_value is True
    events = read_run_dicts(run_path)
    group_started = _of_type(events, "attempt_started")[0]["time"]
    unplaced = _of_type(events, "spare_unplaced")
    assert unplaced and unplaced[0]["wanted"] == spares and not unplaced[0]["gave_up"]
    assert unplaced[0]["ready"] <= spares - 1
    assert group_started < unplaced[0]["time"]  # the group did not wait for the spare
    assert len(_of_type(events, "attempt_started")) == 1 and len(_of_type(events, "report_committed")) == 2
    assert len(_of_type(events, "spare_ready")) <= spares - 1  # the spares that fit count against the CPUs
