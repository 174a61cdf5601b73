"""Property: any schedule of at most ``max_failures`` kills ends with bit-identical weights and no lost checkpoint.

The ``digits`` workload (tiny config: 2 ranks, 6 reports, a checkpoint at each) runs once
without faults, then under >= 20 generated schedules of SIGKILLs at random reports,
before or after the barrier, on random ranks, all on one local Ray (private RAY_TMPDIR)
shared by the module. Each run must finish, end with exactly the reference weights,
resume every attempt from the latest committed checkpoint, and record every fault.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings

from trainkit import FailureConfig, RunConfig, ScalingConfig
from trainkit.events import parse_events
from trainkit.storage import MANIFEST, RunStore
from trainkit.trainer import DataParallelTrainer
from trainkit_testing.cluster import Cluster

from fault_injection import FaultPlan
from fault_injection.scenario import validate_faults
from fault_injection.strategies import fault_schedules
from fault_injection.verdicts import lost_checkpoints

pytestmark = pytest.mark.integration

WORLD_SIZE = 2
MAX_FAILURES = 2
CONFIG = {"epochs": 2, "batch_size": 300, "seed": 0}  # 898 rows per rank -> 3 steps per epoch
REPORTS = 6


@given(fault_schedules(reports=REPORTS, world_size=3, max_faults=3, actions=("kill_worker", "raise", "hang")))
@settings(max_examples=50, deadline=None, database=None)
def test_generated_schedules_are_valid_fault_plans_at_distinct_reports(schedule):
    plan = FaultPlan(validate_faults(schedule))
    indices = [f.at.report for f in plan.faults]
    assert indices == sorted(set(indices)) and all(1 <= i <= REPORTS for i in indices)
    assert all(0 <= f.rank < 3 for f in plan.faults)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: a single node with a CPU per rank, private RAY_TMPDIR."""
    with Cluster(nodes=0, head_cpus=WORLD_SIZE, env={"TRAINKIT_PROGRESS": "0"}, fast_failure=False,
                 log_to_driver=False, tmp_prefix="tkprop-"):
        yield


def _fit(storage: str, faults: list):
    from trainkit.workloads import digits

    name = f"digits-{uuid.uuid4().hex[:8]}"
    rc = RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=MAX_FAILURES),
                   callbacks=[FaultPlan(faults, seed=0)])
    result = DataParallelTrainer(digits, train_loop_config=CONFIG, scaling_config=ScalingConfig(num_workers=WORLD_SIZE),
                                 run_config=rc).fit()
    store = RunStore(storage, name)
    return result, parse_events(store.read_bytes("events.jsonl")).events, store


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    from trainkit.workloads import load_digits_weights

    result, events, _ = _fit(str(tmp_path_factory.mktemp("ref")), [])
    assert result.metrics["step"] == REPORTS
    return load_digits_weights(result.checkpoint)


@pytest.mark.timeout(1800)
@given(schedule=fault_schedules(reports=REPORTS, world_size=WORLD_SIZE, max_faults=MAX_FAILURES))
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_any_schedule_of_at_most_max_failures_kills_ends_with_the_fault_free_weights(reference, tmp_path, schedule):
    import torch

    from trainkit.workloads import load_digits_weights

    result, events, store = _fit(str(tmp_path), schedule)
    weights = load_digits_weights(result.checkpoint)
    assert weights.keys() == reference.keys()
    for k in reference:
        assert torch.equal(weights[k], reference[k]), f"{k} differs after faults {schedule}"
    assert lost_checkpoints(events, store.read_json(MANIFEST), set(store.list_dirs())) == []
    fired = [e for e in events if e.type == "fault_injected"]
    assert sorted(e.index for e in fired) == [f["at"]["report"] for f in schedule]
    indices = [e.index for e in events if e.type == "report_committed"]
    assert sorted(set(indices)) == list(range(1, REPORTS + 1))
