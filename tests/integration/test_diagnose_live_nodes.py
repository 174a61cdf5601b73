"""``trainkit diagnose --live`` on a run whose ranks are on two virtual nodes: each node's ranks are
checked and dumped by a task pinned to that node (the dump's ``node`` says where it ran)."""

from __future__ import annotations

import os
import threading
import time

import pytest

import trainkit
from trainkit import RunConfig, ScalingConfig
from trainkit.diagnostics.live import live_stacks
from trainkit.diagnostics.run_report import load_report
from trainkit.torch import TorchTrainer
from trainkit_testing.cluster import Cluster

from test_diagnose_live import wait_for_first_report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _hold(config):
    trainkit.report({"step": 1})
    while not os.path.exists(config["release"]):
        time.sleep(0.05)  # LIVE-NODES
    trainkit.report({"step": 2})


def test_live_dumps_the_ranks_on_each_node_through_a_task_there(tmp_path):
    storage, release = str(tmp_path / "runs"), str(tmp_path / "release")
    with Cluster(nodes=2, cpus_per_node=1) as cluster:
        box = {}

        def fit():
            try:
                box["result"] = TorchTrainer(_hold, train_loop_config={"release": release},
                                             scaling_config=ScalingConfig(num_workers=2, placement_strategy="SPREAD"),
                                             run_config=RunConfig(name="nodes", storage_path=storage)).fit()
            except BaseException as e:  # noqa: BLE001 - reported below
                box["error"] = e

        t = threading.Thread(target=fit)
        t.start()
        try:
            run = os.path.join(storage, "nodes")
            wait_for_first_report(run)
            report = load_report(run)
            nodes = {r.node_id for r in report.ranks}
            assert len(nodes) == 2 and nodes <= set(cluster_node_ids(cluster)), nodes
            rows = {s.world_rank: s for s in live_stacks(report)}
            assert set(rows) == {0, 1}, rows
            for r in report.ranks:  # each rank was dumped by a task on its own node
                assert rows[r.world_rank].dumped_on == r.node_id, (rows[r.world_rank], r.node_id)
            for s in rows.values():
                assert not s.error.startswith("refused"), s
                assert s.classification == "user_code" and s.user_frame.startswith("_hold ("), s
        finally:
            open(release, "w").close()
            t.join(60)
    assert "error" not in box, box.get("error")


def cluster_node_ids(cluster) -> list:
    return [n.node_id for n in cluster.virtual_nodes]
