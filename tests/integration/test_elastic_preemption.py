"""Elastic resizing and preemption on a real local Ray cluster with virtual nodes.

The module's private three-node cluster is conftest's ``three_nodes``: the tests remove and add
nodes, which the session's shared cluster must never see.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time

import pytest
import ray

import trainkit
from trainkit import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from trainkit import events as ev
from trainkit.torch import TorchTrainer
from trainkit_testing.waiting import wait_for

pytestmark = pytest.mark.integration


def _stepping_loop(config):
    """Checkpoints every step; rank 0 logs world size per step; stops when told."""
    ctx = trainkit.get_context()
    ck = trainkit.get_checkpoint()
    step = int(open(os.path.join(ck.path, "step")).read()) if ck else 0
    while step < 500:
        # One decision for the group: ranks reading the file themselves could disagree and leave
        # one rank at a report barrier that the others never reach.
        if trainkit.collective.broadcast_from_rank_zero(os.path.exists(os.path.join(config["dir"], "stop"))):
            break
        step += 1
        d = tempfile.mkdtemp()
        if ctx.get_world_rank() == 0:
            with open(os.path.join(d, "step"), "w") as f:
                f.write(str(step))
        saved_for_preemption = ctx.is_preempted()
        time.sleep(config.get("step_s", 0.05))
        trainkit.report({"step": step, "world_size": ctx.get_world_size(), "preempt_save": saved_for_preemption},
                        checkpoint=Checkpoint.from_directory(d))
        if ctx.get_world_rank() == 0:
            with open(os.path.join(config["dir"], "progress"), "a") as f:
                f.write(f"{step} {ctx.get_world_size()} {ctx.get_attempt()}\n")
    return step


def _last_progress(dirname: str):
    p = os.path.join(dirname, "progress")
    if not os.path.exists(p):
        return None
    lines = open(p).read().split("\n")
    return tuple(int(x) for x in lines[-2].split()) if len(lines) > 1 else None


def _fit_in_thread(config, scaling, run_config):
    out = {}

    def go():
        try:
            out["result"] = TorchTrainer(_stepping_loop, train_loop_config=config, scaling_config=scaling,
                                         run_config=run_config).fit()
        except Exception as e:  # noqa: BLE001 - asserted by the test
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_elastic_group_shrinks_on_node_loss_and_grows_back_when_a_node_returns(three_nodes, tmp_path):
    c, nodes = three_nodes
    work = str(tmp_path / "work")
    os.makedirs(work)
    rc = RunConfig(name="elastic", storage_path=str(tmp_path / "runs"), failure_config=FailureConfig(max_failures=2))
    t, out = _fit_in_thread({"dir": work}, ScalingConfig(num_workers=(1, 3)), rc)
    wait_for(lambda: (_last_progress(work) or (0, 0))[1] == 3, 90, "3 workers")
    c.remove_node(nodes[2])
    wait_for(lambda: (_last_progress(work) or (0, 0))[1] == 2, 60, "the group to shrink to 2")
    nodes[2] = c.add_node(num_cpus=1)
    wait_for(lambda: (_last_progress(work) or (0, 0))[1] == 3, 60, "the group to grow back to 3")
    open(os.path.join(work, "stop"), "w").close()
    t.join(60)
    assert "error" not in out, out.get("error")
    result = out["result"]
    events = ev.read_run(result.path)
    resizes = [(e.old_world_size, e.new_world_size) for e in events if isinstance(e, ev.Resized)]
    assert (3, 2) in resizes and resizes[-1][1] == 3
    # every report index of the final lineage is present exactly once
    steps = list(result.metrics_dataframe["step"])
    assert steps == list(range(1, len(steps) + 1))


def test_preempted_rank_saves_a_checkpoint_in_its_grace_period_and_the_run_resumes_from_it(three_nodes, tmp_path):
    work = str(tmp_path / "work")
    os.makedirs(work)
    rc = RunConfig(name="preempt", storage_path=str(tmp_path / "runs"), failure_config=FailureConfig(max_failures=0))
    t, out = _fit_in_thread({"dir": work, "step_s": 0.1}, ScalingConfig(num_workers=2), rc)
    run_path = os.path.join(str(tmp_path / "runs"), "preempt")
    wait_for(lambda: (_last_progress(work) or (0,))[0] >= 3, 90, "3 steps")
    started = [e for e in ev.read_run(run_path) if isinstance(e, ev.AttemptStarted) and e.ranks]
    victim = next(r for r in started[-1].ranks if r["world_rank"] == 1)
    os.kill(victim["pid"], signal.SIGTERM)  # the notice; the controller stops the group after the next commit
    wait_for(lambda: (_last_progress(work) or (0, 0, 1))[2] >= 2, 60, "the restarted attempt")
    open(os.path.join(work, "stop"), "w").close()
    t.join(60)
    assert "error" not in out, out.get("error")  # max_failures=0: a preemption is not a failure
    events = ev.read_run(run_path)
    assert any(isinstance(e, ev.Preempted) and 1 in e.world_ranks for e in events)
    failed = [e for e in events if isinstance(e, ev.WorkerFailed)]
    assert failed and all(e.kind == "preemption" and e.will_retry for e in failed)
    # the rank saw the notice and the checkpoint of that report is where attempt 2 started
    saves = [e for e in events if isinstance(e, ev.ReportCommitted) and e.metrics.get("preempt_save") is False]
    attempt2 = [e for e in events if isinstance(e, ev.AttemptStarted) and e.attempt == 2][0]
    assert attempt2.start_index >= 3 and saves


def test_an_elastic_group_drops_a_noticed_rank_at_once_and_regrows_its_slot_once_the_node_left(three_nodes, tmp_path):
    """A 600 s notice: the survivors re-form without the noticed rank at once (they never wait for its
    node to go), and its slot starts a new worker only once that node has left."""
    c, nodes = three_nodes
    work = str(tmp_path / "work")
    os.makedirs(work)
    run_path = os.path.join(str(tmp_path / "runs"), "notice")
    rc = RunConfig(name="notice", storage_path=str(tmp_path / "runs"), failure_config=FailureConfig(max_failures=0),
                   worker_runtime_env={"env_vars": {"TRAINKIT_PREEMPTION_GRACE_S": "600"}})
    t, out = _fit_in_thread({"dir": work}, ScalingConfig(num_workers=(1, 3)), rc)
    wait_for(lambda: (_last_progress(work) or (0, 0))[1] == 3, 90, "3 workers")
    ranks = [e for e in ev.read_run(run_path) if isinstance(e, ev.AttemptStarted)][-1].ranks
    victim = next(r for r in ranks if r["world_rank"] == 2)
    os.kill(victim["pid"], signal.SIGTERM)
    wait_for(lambda: (_last_progress(work) or (0, 0))[1] == 2, 60, "the group to go on with 2 (not waiting 600 s)")
    node = next(n for n in nodes if n.node_id == victim["node_id"])
    assert victim["node_id"] in {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # the noticed node is still there
    events = ev.read_run(run_path)
    assert not [e for e in events if isinstance(e, ev.SpareReady) and e.regrow], \
        "the noticed rank's slot started a worker while its node was still there"
    nodes.remove(node)
    c.remove_node(node)
    nodes.append(c.add_node(num_cpus=1))
    wait_for(lambda: (_last_progress(work) or (0, 0))[1] == 3, 90, "the group to grow back to 3")
    open(os.path.join(work, "stop"), "w").close()
    t.join(60)
    assert "error" not in out, out.get("error")
    events = ev.read_run(run_path)
    (notice,) = [e for e in events if isinstance(e, ev.Preempted)]
    assert notice.grace_s == 600 and notice.world_ranks == (2,)
    resizes = [(e.old_world_size, e.new_world_size) for e in events if isinstance(e, ev.Resized)]
    assert (3, 2) in resizes and resizes[-1] == (2, 3)
    started = [e for e in events if isinstance(e, ev.AttemptStarted)]
    assert started[-1].ranks[0]["pid"] == ranks[0]["pid"]  # rank 0 kept its process throughout
    steps = list(out["result"].metrics_dataframe["step"])
    assert steps == list(range(1, len(steps) + 1))
