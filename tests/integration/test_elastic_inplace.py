"""Elastic resizing in place (issue 17): on a node loss the survivors keep their processes and the
process group re-forms smaller; when capacity returns the new worker starts in the background and
the group grows at a checkpointed report, the survivors again keeping their processes.

The module's private three-node cluster is conftest's ``three_nodes``: the test removes and adds
nodes, which the session's shared cluster must never see. Real Ray, real gloo process groups.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest

import trainkit
from trainkit import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from trainkit import events as ev
from trainkit.torch import TorchTrainer
from trainkit_testing.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _of_type(events: list[ev.Event], kind: type[ev.Event]) -> list:
    return [e for e in events if isinstance(e, kind)]


def _loop(config):
    """A checkpoint every step, with a gloo all_reduce (a real process group: it must re-form at
    each new size); rank 0 logs the world size; stops when told."""
    import torch
    import torch.distributed as dist

    ctx = trainkit.get_context()
    ck = trainkit.get_checkpoint()
    step = int(open(os.path.join(ck.path, "step")).read()) if ck else 0
    while True:
        if trainkit.collective.broadcast_from_rank_zero(os.path.exists(os.path.join(config["dir"], "stop"))):
            return step
        t = torch.ones(1)
        dist.all_reduce(t)
        assert int(t.item()) == ctx.get_world_size() == dist.get_world_size()
        step += 1
        d = tempfile.mkdtemp()
        if ctx.get_world_rank() == 0:
            with open(os.path.join(d, "step"), "w") as f:
                f.write(str(step))
        time.sleep(0.05)
        trainkit.report({"step": step, "world_size": ctx.get_world_size()}, checkpoint=Checkpoint.from_directory(d))
        if ctx.get_world_rank() == 0:
            with open(os.path.join(config["dir"], "progress"), "a") as f:
                f.write(f"{step} {ctx.get_world_size()}\n")


def _world_size(work: str) -> int:
    try:
        lines = open(os.path.join(work, "progress")).read().split("\n")
    except OSError:
        return 0
    return int(lines[-2].split()[1]) if len(lines) > 1 else 0


def test_a_node_loss_shrinks_the_group_in_place_and_a_returned_node_grows_it_back_keeping_the_survivors(
        three_nodes, tmp_path):
    c, nodes = three_nodes
    work = str(tmp_path / "work")
    os.makedirs(work)
    storage = str(tmp_path / "runs")
    run_path = os.path.join(storage, "inplace")
    out = {}

    def go():
        try:
            out["result"] = TorchTrainer(_loop, train_loop_config={"dir": work},
                                         scaling_config=ScalingConfig(num_workers=(1, 3)),
                                         run_config=RunConfig(name="inplace", storage_path=storage,
                                                              failure_config=FailureConfig(max_failures=2))).fit()
        except Exception as e:  # noqa: BLE001 - asserted below
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    wait_for(lambda: _world_size(work) == 3, 120, "3 workers")
    ranks = _of_type(ev.read_run(run_path), ev.AttemptStarted)[-1].ranks
    rank0 = next(r for r in ranks if r["world_rank"] == 0)
    victim = next(r for r in ranks if r["node_id"] != rank0["node_id"])
    survivors = {r["pid"] for r in ranks if r["node_id"] != victim["node_id"]}
    node = next(n for n in nodes if n.node_id == victim["node_id"])
    c.remove_node(node)
    wait_for(lambda: _world_size(work) == 2, 60, "the group to shrink to 2")
    nodes[nodes.index(node)] = c.add_node(num_cpus=1)
    wait_for(lambda: _world_size(work) == 3, 90, "the group to grow back to 3")
    open(os.path.join(work, "stop"), "w").close()
    t.join(90)
    assert "error" not in out, out.get("error")
    result = out["result"]

    events = ev.read_run(run_path)
    attempts = _of_type(events, ev.AttemptStarted)
    pids = [{r["pid"] for r in a.ranks} for a in attempts]
    sizes = [a.world_size for a in attempts]
    assert sizes == [3, 2, 3], sizes
    assert pids[1] == survivors  # shrunk: exactly the survivors, the same processes
    assert survivors < pids[2] and victim["pid"] not in pids[2]  # grown: the survivors plus one new process
    resizes = [(e.old_world_size, e.new_world_size, e.reason) for e in _of_type(events, ev.Resized)]
    assert resizes == [(3, 2, "shrink"), (2, 3, "grow")]
    # the new worker was started in the background while the group of 2 ran, and joined once ready
    (joined,) = [e for e in _of_type(events, ev.SpareReady) if e.regrow]
    assert joined.pid in pids[2] and attempts[1].time < joined.time < attempts[2].time
    # every committed report is in the history exactly once, and the restarts resumed from the latest one
    steps = list(result.metrics_dataframe["step"])
    assert steps == list(range(1, len(steps) + 1))
    commits = _of_type(events, ev.ReportCommitted)
    for a in attempts[1:]:
        before = [e.index for e in commits if e.time < a.time]
        assert a.start_index == max(before)
