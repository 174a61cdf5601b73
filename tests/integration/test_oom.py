"""A rank killed by the kernel's OOM killer is classified ``oom``, not a plain death.

Rank 1 moves itself into a memory cgroup of its own with a 64 MiB limit and allocates past
it: the kernel kills it (SIGKILL), as it would a worker that outgrows its container. Needs a
writable memory cgroup (root; skipped elsewhere)."""

from __future__ import annotations

import os

import pytest

import trainkit
from trainkit import RunConfig, ScalingConfig, WorkerGroupError
from trainkit.diagnostics.memory import memory_cgroup
from trainkit.diagnostics.run_report import load_report
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(180)]

LIMIT = 64 * 2**20


def _own_cgroup_or_none(tag: str):
    parent = memory_cgroup()
    if parent is None or not os.path.exists(os.path.join(parent, "memory.limit_in_bytes")):
        return None
    path = os.path.join(parent, tag)
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(LIMIT))
    except OSError:
        return None
    return path


def _eats_memory(config):
    import time

    trainkit.report({"step": 1})
    if trainkit.get_context().get_world_rank() == 1:
        with open(os.path.join(config["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(1.5)  # the memory watch sees the new cgroup
        hog = []
        for _ in range(40):  # 40 x 16 MiB, touched: far past the 64 MiB limit
            hog.append(bytearray(16 * 2**20))
    trainkit.report({"step": 2})


def test_a_worker_killed_by_the_oom_killer_is_classified_oom(storage_path):
    cgroup = _own_cgroup_or_none(f"trainkit_oom_test_{os.getpid()}")
    if cgroup is None:
        pytest.skip("no writable memory cgroup here (needs root and cgroup v1 memory)")
    try:
        with pytest.raises(WorkerGroupError) as info:
            TorchTrainer(_eats_memory, train_loop_config={"cgroup": cgroup},
                         scaling_config=ScalingConfig(num_workers=2),
                         run_config=RunConfig(name="oom", storage_path=storage_path)).fit()
        root = info.value.failures[0]
        assert (root.world_rank, root.kind) == (1, "oom"), info.value.failures
        assert root.message.startswith("killed for memory: the kernel's OOM killer killed it"), root.message
        assert root.memory["limit"] == LIMIT and root.memory["rss_samples"], root.memory
        rep = load_report(os.path.join(storage_path, "oom"))
        assert rep.failures[0].worker.kind == "oom"
        assert any("rank 1 was killed for memory" in s for s in rep.suggestions), rep.suggestions
    finally:
        try:
            os.rmdir(cgroup)
        except OSError:
            pass
