"""Every trainkit exception survives pickle (they cross process boundaries) with its fields and message."""

from __future__ import annotations

import inspect
import pickle

import pytest

from trainkit import errors
from trainkit.errors import (CheckpointError, ConfigError, ControllerError, HangDetectedError, MissingExtraError,
                             OutputError, ReportError, StorageFailedError, RunOwnedError, ScenarioError, SessionError, StorageError, TrainingFailedError, TrainkitError,
                             WorkerFailure, WorkerGroupError, NCCLHangError, PreemptionError, PreemptionInfo,
                             DeprecatedSettingError)

_FAILURES = [
    WorkerFailure(world_rank=1, node_id="node-abcdef0123456789", pid=4242, kind="died", exc_type="",
                  message="killed by SIGKILL", exit_code=-9),
    WorkerFailure(world_rank=0, node_id="node-2", pid=17, kind="exception", exc_type="ValueError",
                  message="bad batch", traceback="Traceback (most recent call last):\n  ...\nValueError: bad batch\n"),
]

_EXAMPLES = [
    TrainkitError("root"),
    ConfigError("ScalingConfig.num_workers", -1, "an int >= 0", hint="use 0 for local mode"),
    ConfigError("a free-form message"),
    ScenarioError("unknown key 'atx'", path="scenarios/preempt.yaml", line=7, key="faults[0].atx", suggestion="at"),
    StorageError("storage 's3://b' is not writable"),
    RunOwnedError("run /r/x is in use by another driver: pid 7 on host-a", {"host": "host-a", "pid": 7}),
    OutputError("cannot write /nope/out.json: [Errno 2] No such file or directory"),
    CheckpointError("ranks 0 and 1 both wrote 'model.pt'"),
    SessionError("`report` cannot be used outside of a trainkit training function"),
    ReportError("ranks called different collectives"),
    TrainingFailedError("retries exhausted", _FAILURES),
    WorkerGroupError("rank 1 died", _FAILURES),
    ControllerError("placement group never ready"),
    HangDetectedError("ranks [1] missing at report 3", _FAILURES[:1]),
    StorageFailedError("the storage is full", _FAILURES[:1]),
    NCCLHangError("ranks [1] stuck in all_reduce", _FAILURES[:1]),
    PreemptionError("2 preemption(s), max_preemptions=1",
                    [WorkerFailure(world_rank=1, node_id="n1", kind="preempted", message="preempted")]),
    PreemptionError("explicit info", [], preemption_info=PreemptionInfo(1700000000000, {"n2": [0, 1]}),
                    drain_timed_out=True),
    DeprecatedSettingError("RunConfig.verbose", "a Ray Tune setting"),
    MissingExtraError("trainkit chaos", "chaos", ["pydantic", "yaml"], "pip install 'trainkit[chaos]'"),
]

_FIELDS = ("feature", "extra", "missing", "field", "value", "allowed", "hint", "path", "line", "key", "suggestion", "message", "failures",
           "preemption_info", "drain_timed_out", "why")


def _exception_classes():
    return {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, BaseException) and obj.__module__ == errors.__name__}


def test_the_examples_cover_every_exception_class_in_trainkit_errors():
    assert _exception_classes() == {type(e) for e in _EXAMPLES}


def test_every_exception_is_under_trainkit_error():
    assert all(issubclass(c, TrainkitError) for c in _exception_classes())
    assert issubclass(ScenarioError, ConfigError) and issubclass(ScenarioError, ValueError)
    assert issubclass(WorkerGroupError, TrainingFailedError)
    assert issubclass(ControllerError, TrainingFailedError)
    assert issubclass(HangDetectedError, TrainingFailedError)
    assert issubclass(SessionError, RuntimeError)
    assert issubclass(RunOwnedError, ConfigError) and issubclass(RunOwnedError, StorageError)
    assert issubclass(NCCLHangError, HangDetectedError) and issubclass(NCCLHangError, WorkerGroupError)
    assert issubclass(PreemptionError, TrainingFailedError) and not issubclass(PreemptionError, WorkerGroupError)
    assert issubclass(DeprecatedSettingError, ConfigError) and issubclass(DeprecatedSettingError, DeprecationWarning)


def test_a_preemption_error_names_the_preempted_nodes_and_ranks_from_its_failures():
    e = PreemptionError("x", [WorkerFailure(world_rank=2, node_id="a", kind="preempted"),
                              WorkerFailure(world_rank=0, node_id="a", kind="preempted"),
                              WorkerFailure(world_rank=1, node_id="b", kind="died")])
    assert e.preemption_info == PreemptionInfo(None, {"a": [0, 2]})
    assert e.preemption_info.preempted_ranks == [0, 2] and e.preemption_info.preempted_node_ids == ["a"]
    assert TrainingFailedError.from_dict(e.to_dict()).__class__ is PreemptionError


@pytest.mark.parametrize("exc", _EXAMPLES, ids=lambda e: f"{type(e).__name__}")
def test_exception_survives_pickle_with_its_fields_and_message(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == exc.args
    for name in _FIELDS:
        if hasattr(exc, name):
            assert getattr(back, name) == getattr(exc, name), name


def test_config_error_message_names_the_field_the_value_and_what_is_allowed():
    e = ConfigError("ScalingConfig.num_workers", -1, "an int >= 0", hint="use 0 for local mode")
    assert str(e) == "ScalingConfig.num_workers=-1 is invalid: expected an int >= 0 (use 0 for local mode)"


def test_scenario_error_message_has_the_location_and_a_suggestion():
    e = ScenarioError("unknown key 'atx'", path="s.yaml", line=7, key="faults[0].atx", suggestion="at")
    assert str(e) == "s.yaml:7: unknown key 'atx' (did you mean 'at'?)"
    assert e.field == "faults[0].atx"


def test_training_failed_error_names_rank_node_and_traceback():
    e = WorkerGroupError("retries exhausted", _FAILURES)
    text = str(e)
    assert text.startswith("Training failed due to worker errors: retries exhausted")
    assert "rank 1 (node node-abcdef0, pid 4242, exit code -9): killed by SIGKILL" in text
    assert "ValueError: bad batch" in text
    assert set(e.worker_failures) == {0, 1}


def test_training_failed_error_round_trips_through_its_json_dict():
    for exc in (TrainingFailedError("x", _FAILURES), WorkerGroupError("y", _FAILURES),
                ControllerError("z"), HangDetectedError("h", _FAILURES[:1])):
        back = TrainingFailedError.from_dict(exc.to_dict())
        assert type(back) is type(exc)
        assert str(back) == str(exc)
        assert back.failures == exc.failures
