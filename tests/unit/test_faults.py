"""Fault model and injector: pure trigger logic, and FaultPlan on the in-process (local) backend."""

from __future__ import annotations

import pickle

import pytest

from trainkit import FailureConfig, RunConfig, ScalingConfig
from trainkit.errors import ConfigError, ScenarioError, TrainingFailedError
from trainkit.events import read_run
from trainkit.trainer import DataParallelTrainer

from fault_injection import FaultPlan
from fault_injection import faults as F
from fault_injection.scenario import validate_faults


def _one(mapping):
    return validate_faults([mapping])[0]


def _key(fault, index, *, attempt=1, first=False, metrics=None, elapsed_s=0.0, rank=0, fid="f"):
    return F.firing_key(fault, fid, index=index, attempt=attempt, first_of_attempt=first, metrics=metrics or {},
                        elapsed_s=elapsed_s, world_rank=rank)


def test_a_report_trigger_fires_only_at_its_report_with_the_same_key_every_time():
    f = _one({"action": "kill_worker", "rank": 1, "at": {"report": 3}})
    assert [_key(f, i) for i in (1, 2, 4)] == [None, None, None]
    assert _key(f, 3) == _key(f, 3, attempt=2) == "f@r3"


def test_every_fires_again_at_each_later_multiple_with_a_distinct_key():
    f = _one({"action": "kill_worker", "at": {"report": 2}, "every": 3})
    keys = {i: _key(f, i) for i in range(1, 10)}
    assert {i for i, k in keys.items() if k} == {2, 5, 8}
    assert len({keys[2], keys[5], keys[8]}) == 3


def test_attempt_metric_and_time_triggers():
    f = _one({"action": "raise", "at": {"attempt": 2, "report": 1}})
    assert _key(f, 1, attempt=1) is None and _key(f, 1, attempt=2) == "f@a2@r1"
    only_attempt = _one({"action": "raise", "at": {"attempt": 3}})
    assert _key(only_attempt, 5, attempt=3, first=True) and not _key(only_attempt, 6, attempt=3, first=False)
    m = _one({"action": "raise", "at": {"metric": {"epoch": 2}}})
    assert _key(m, 4, metrics={"epoch": 1}) is None and _key(m, 5, metrics={"epoch": 2.0}) == "f"
    t = _one({"action": "slow", "delay_s": 0.1, "at": {"time_s": 5}, "every": 2})
    assert _key(t, 1, elapsed_s=4.9) is None
    assert _key(t, 2, elapsed_s=5.5) != _key(t, 3, elapsed_s=7.5)


def test_targets_a_list_fires_per_rank_random_is_seeded_and_any_is_unrestricted():
    f = _one({"action": "kill_worker", "rank": [0, 2], "at": {"report": 1}})
    assert F.target_ranks(f, "f", 0, 4) == {0, 2}
    assert _key(f, 1, rank=0) != _key(f, 1, rank=2)
    r = _one({"action": "kill_worker", "rank": "random", "at": {"report": 1}})
    picks = {F.target_ranks(r, "f", seed, 4).pop() for seed in range(40)}
    assert F.target_ranks(r, "f", 7, 4) == F.target_ranks(r, "f", 7, 4) and len(picks) > 1 and picks <= {0, 1, 2, 3}
    assert F.target_ranks(_one({"action": "hang", "rank": "any", "at": {"report": 1}}), "f", 0, 4) is None
    assert F.target_ranks(_one({"action": "hang", "at": {"report": 1}}), "f", 0, 4) == {0}


@pytest.mark.parametrize("bad, words", [
    ({"action": "kill_wroker", "at": {"report": 1}}, ["kill_worker"]),
    ({"action": "kill_worker", "at": {"reprot": 1}}, ["report"]),
    ({"action": "kill_worker", "at": {"report": 1, "time_s": 3}}, ["one of report"]),
    ({"action": "raise", "exception": "NoSuchError", "at": {"report": 1}}, ["NoSuchError"]),
    ({"action": "kill_worker", "signal": "SIGFOO", "at": {"report": 1}}, ["SIGFOO"]),
    ({"action": "kill_worker", "every": 2, "at": {"metric": {"loss": 1}}}, ["every"]),
    ({"action": "kill_worker", "rank": -1, "at": {"report": 1}}, ["rank"]),
])
def test_a_bad_fault_is_a_scenario_error_naming_the_key(bad, words):
    with pytest.raises(ScenarioError) as e:
        FaultPlan([bad])
    text = str(e.value)
    assert all(w in text for w in words), text
    assert isinstance(e.value, ValueError) and pickle.loads(pickle.dumps(e.value)).args == e.value.args


def test_typed_faults_and_mappings_are_the_same_plan():
    typed = F.KillWorker(action="kill_worker", rank=1, at=F.Trigger(report=3))
    plan = FaultPlan([typed, {"action": "kill_worker", "rank": 1, "at": {"report": 3}}])
    assert plan.faults[0] == plan.faults[1]
    hook = plan.worker_hook()
    assert pickle.loads(pickle.dumps(hook)).faults == hook.faults


def test_node_faults_without_a_broker_fail_before_any_worker_starts():
    plan = FaultPlan([{"action": "kill_node", "node": 1, "at": {"report": 2}}])
    with pytest.raises(ConfigError, match="NodeBroker"):
        plan.worker_hook()


# -- the injector on the local backend (real runtime, in this process) -------------------------------
def _fit(tmp_path, plan, max_failures, steps=5, name="run"):
    from trainkit.workloads import counter

    rc = RunConfig(name=name, storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=max_failures),
                   callbacks=[plan])
    trainer = DataParallelTrainer(counter, train_loop_config={"steps": steps},
                                  scaling_config=ScalingConfig(num_workers=0), run_config=rc)
    return trainer.fit()


def _events(tmp_path, name="run"):
    return read_run(tmp_path / name)


def test_a_raise_fires_once_and_the_retried_attempt_replays_the_report_without_it(tmp_path):
    plan = FaultPlan([{"action": "raise", "exception": "ValueError", "message": "boom", "at": {"report": 3}}])
    result = _fit(tmp_path, plan, max_failures=1)
    assert [m["step"] for m in result.metrics_dataframe.to_dict("records")] == [1, 2, 3, 4, 5]
    events = _events(tmp_path)
    faults = [e for e in events if e.type == "fault_injected"]
    assert len(faults) == 1 and faults[0].index == 3 and faults[0].detail["exception"] == "ValueError"
    failed = [e for e in events if e.type == "worker_failed"]
    assert len(failed) == 1 and "boom" in failed[0].failures[0]["message"]
    assert len(plan.injected) == 1  # on_event saw it


def test_after_places_the_fault_behind_the_commit(tmp_path):
    plan = FaultPlan([{"action": "raise", "when": "after", "at": {"report": 3}}])
    _fit(tmp_path, plan, max_failures=1)
    attempts = [e for e in _events(tmp_path) if e.type == "attempt_started"]
    assert attempts[-1].start_index == 3  # report 3 was committed before the raise


def test_a_fault_past_max_failures_fails_the_run_with_its_message(tmp_path):
    plan = FaultPlan([{"action": "raise", "message": "injected twice", "at": {"report": 2}, "every": 1}])
    with pytest.raises(TrainingFailedError, match="injected twice"):
        _fit(tmp_path, plan, max_failures=1)


def test_storage_errors_below_the_retry_budget_are_survived_and_the_checkpoint_is_whole(tmp_path):
    from trainkit import storage

    plan = FaultPlan([{"action": "storage_error", "operation": "upload", "count": storage.WRITE_TRIES - 1,
                       "at": {"report": 2}}])
    result = _fit(tmp_path, plan, max_failures=0)
    assert result.metrics["step"] == 5 and storage.fault_hook() is None
    assert (tmp_path / "run" / "checkpoint_2" / "counter.json").read_text() == '{"step": 2}'


def test_storage_errors_beyond_the_retry_budget_fail_the_report(tmp_path):
    from trainkit import storage

    plan = FaultPlan([{"action": "storage_error", "operation": "upload", "count": storage.WRITE_TRIES,
                       "error": "SlowDown", "at": {"report": 2}}])
    try:
        with pytest.raises(TrainingFailedError, match="SlowDown"):
            _fit(tmp_path, plan, max_failures=0)
    finally:
        storage.set_fault_hook(None)


def test_slow_delays_the_reports_it_covers(tmp_path):
    import time

    plan = FaultPlan([{"action": "slow", "delay_s": 0.1, "reports": 3, "at": {"report": 2}}])
    t0 = time.monotonic()
    _fit(tmp_path, plan, max_failures=0, steps=6)
    assert time.monotonic() - t0 >= 0.3
    fault = [e for e in _events(tmp_path) if e.type == "fault_injected"]
    assert len(fault) == 1 and fault[0].detail["delay_s"] == 0.1


def test_a_plan_with_a_broker_pickles_to_the_controller_with_only_the_broker_address():
    import threading

    class FakeBroker:  # a NodeBroker holds a thread and a cluster: neither may travel
        lock = threading.Lock()

        def address(self):
            return ("trainkit_node_broker_x", "ns")

    plan = FaultPlan([{"action": "kill_node", "node": 1, "at": {"report": 2}}], broker=FakeBroker())
    copy = pickle.loads(pickle.dumps(plan))
    assert copy.worker_hook().broker_address == ("trainkit_node_broker_x", "ns")
