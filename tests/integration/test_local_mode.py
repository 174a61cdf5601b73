"""Local mode (num_workers=0) keeps the full contract: storage, retention, resume, retries, events."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

import trainkit
from trainkit import (Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig,
                      TrainingFailedError, WorkerGroupError)
from trainkit.torch import TorchTrainer

pytestmark = pytest.mark.integration


def _fit(train_func, storage_path, name, *, config=None, failure_config=None, checkpoint_config=None):
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name=name, storage_path=storage_path, failure_config=failure_config,
                             checkpoint_config=checkpoint_config),
    )
    return trainer.fit()


def _report_step(step, extra=None, **metrics):
    """Report ``step`` with a checkpoint holding ``step.json`` (and ``extra`` files)."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "step.json"), "w") as f:
            json.dump({"step": step}, f)
        for name, data in (extra or {}).items():
            with open(os.path.join(d, name), "w") as f:
                f.write(data)
        trainkit.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(d))


def _step_of(ckpt):
    with ckpt.as_directory() as d:
        with open(os.path.join(d, "step.json")) as f:
            return json.load(f)["step"]


def _dirs_on_disk(run_path):
    return sorted(e for e in os.listdir(run_path) if e.startswith("checkpoint_"))


# The Ray docs' local-mode unit test, with trainkit imports and nothing else changed.
def test_training_runs():
    from trainkit import ScalingConfig
    from trainkit.torch import TorchTrainer

    def train_func(config):
        # Report minimal training result
        trainkit.report({"loss": 0.5})

    trainer = TorchTrainer(
        train_loop_per_worker=train_func,
        scaling_config=ScalingConfig(num_workers=0),
    )
    result = trainer.fit()

    assert result.error is None
    assert result.metrics["loss"] == 0.5


def test_default_storage_path_comes_from_the_environment_and_the_run_is_written_there(tmp_path):
    def train_func():
        trainkit.report({"loss": 0.25})

    result = TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=0)).fit()
    assert result.path.startswith(str(tmp_path / "default_storage"))
    assert os.path.isfile(os.path.join(result.path, "run_state.json"))


def test_a_resumable_loop_run_twice_continues_from_the_last_committed_checkpoint(storage_path):
    starts = []

    def train_func(config):
        ckpt = trainkit.get_checkpoint()
        start = _step_of(ckpt) + 1 if ckpt else 1
        starts.append(start)
        for step in range(start, start + config["steps"]):
            _report_step(step, loss=1.0 / step)

    first = _fit(train_func, storage_path, "resumable", config={"steps": 3})
    second = _fit(train_func, storage_path, "resumable", config={"steps": 2})
    assert starts == [1, 4]
    assert first.metrics["step"] == 3
    assert second.metrics["step"] == 5
    assert _step_of(second.checkpoint) == 5
    assert second.checkpoint.path == os.path.join(storage_path, "resumable", "checkpoint_5")
    assert list(second.metrics_dataframe["step"]) == [1, 2, 3, 4, 5]
    assert _dirs_on_disk(second.path) == [f"checkpoint_{i}" for i in range(1, 6)]


def test_a_crashed_run_resumes_from_its_last_committed_checkpoint_in_a_new_fit(storage_path):
    starts = []

    def train_func(config):
        ckpt = trainkit.get_checkpoint()
        start = _step_of(ckpt) + 1 if ckpt else 1
        starts.append(start)
        for step in range(start, 5):
            if step == config.get("crash_at"):
                raise RuntimeError(f"crash at step {step}")
            _report_step(step)

    with pytest.raises(WorkerGroupError):
        _fit(train_func, storage_path, "crashy", config={"crash_at": 3})
    result = _fit(train_func, storage_path, "crashy", config={})
    assert starts == [1, 3]
    assert result.error is None
    assert result.metrics["step"] == 4
    assert list(result.metrics_dataframe["step"]) == [1, 2, 3, 4]


def test_max_failures_reruns_in_process_and_get_checkpoint_gives_the_latest_on_retry(storage_path):
    seen = []

    def train_func():
        attempt = trainkit.get_context().get_attempt()
        ckpt = trainkit.get_checkpoint()
        seen.append((attempt, _step_of(ckpt) if ckpt else None, os.getpid()))
        start = _step_of(ckpt) + 1 if ckpt else 1
        _report_step(start)
        if attempt < 3:
            raise ValueError(f"fail in attempt {attempt}")
        _report_step(start + 1)
        return "done"

    result = _fit(train_func, storage_path, "retries", failure_config=FailureConfig(max_failures=2))
    assert [(a, s) for a, s, _ in seen] == [(1, None), (2, 1), (3, 2)]
    assert {pid for _, _, pid in seen} == {os.getpid()}
    assert result.error is None
    assert result.attempts == 3
    assert result.return_value == "done"
    assert result.metrics["step"] == 4
    assert list(result.metrics_dataframe["step"]) == [1, 2, 3, 4]


def test_failing_past_max_failures_raises_worker_group_error_and_from_path_shows_it(storage_path):
    attempts = []

    def train_func():
        attempts.append(trainkit.get_context().get_attempt())
        trainkit.report({"loss": 1.0})
        raise ValueError("the loss exploded")

    with pytest.raises(WorkerGroupError) as info:
        _fit(train_func, storage_path, "doomed", failure_config=FailureConfig(max_failures=1))
    err = info.value
    assert isinstance(err, TrainingFailedError)
    assert attempts == [1, 2]
    assert "the loss exploded" in str(err)
    assert err.failures[0].world_rank == 0
    assert err.failures[0].exc_type == "ValueError"
    assert "raise ValueError" in err.failures[0].traceback

    restored = Result.from_path(os.path.join(storage_path, "doomed"))
    assert isinstance(restored.error, WorkerGroupError)
    assert str(restored.error) == str(err)
    assert restored.metrics == {"loss": 1.0}
    with open(os.path.join(storage_path, "doomed", "run_state.json")) as f:
        assert json.load(f)["status"] == "failed"


def test_retention_keeps_the_best_plus_latest_and_from_path_has_the_same_best_checkpoints(storage_path):
    accs = [0.5, 0.9, 0.1, 0.7, 0.3]

    def train_func():
        for step, acc in enumerate(accs, start=1):
            _report_step(step, acc=acc)

    result = _fit(train_func, storage_path, "retention",
                  checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="acc",
                                                     checkpoint_score_order="max"))
    best = [(os.path.basename(c.path), m["acc"]) for c, m in result.best_checkpoints]
    assert best == [("checkpoint_4", 0.7), ("checkpoint_2", 0.9)]  # worst -> best
    assert os.path.basename(result.checkpoint.path) == "checkpoint_5"  # latest, not best
    assert _dirs_on_disk(result.path) == ["checkpoint_2", "checkpoint_4", "checkpoint_5"]
    assert result.get_best_checkpoint("acc", "max").path == result.best_checkpoints[-1][0].path

    restored = Result.from_path(result.path)
    assert [(c.path, m) for c, m in restored.best_checkpoints] == \
        [(c.path, m) for c, m in result.best_checkpoints]
    assert restored.checkpoint.path == result.checkpoint.path
    assert restored.metrics == result.metrics
    assert restored.error is None
    assert restored.metrics_dataframe.equals(result.metrics_dataframe)


def test_retention_with_min_order_ranks_a_missing_score_worst(storage_path):
    def train_func():
        _report_step(1, loss=0.4)
        _report_step(2)  # no loss: ranks worst in either order
        _report_step(3, loss=0.2)
        _report_step(4, loss=0.9)

    result = _fit(train_func, storage_path, "retention_min",
                  checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss",
                                                     checkpoint_score_order="min"))
    assert [os.path.basename(c.path) for c, _ in result.best_checkpoints] == ["checkpoint_1", "checkpoint_3"]
    assert _dirs_on_disk(result.path) == ["checkpoint_1", "checkpoint_3", "checkpoint_4"]


def test_metrics_dataframe_has_one_row_per_report_with_or_without_checkpoint(storage_path):
    def train_func():
        for step in range(1, 6):
            if step % 2:
                _report_step(step, loss=step * 0.1)
            else:
                trainkit.report({"step": step, "loss": step * 0.1})

    result = _fit(train_func, storage_path, "history")
    df = result.metrics_dataframe
    assert len(df) == 5
    assert list(df["step"]) == [1, 2, 3, 4, 5]
    assert result.metrics == {"step": 5, "loss": 0.5}
    assert _dirs_on_disk(result.path) == ["checkpoint_1", "checkpoint_3", "checkpoint_5"]


def test_get_all_reported_checkpoints_lists_the_retained_checkpoints_with_metrics(storage_path):
    listings = []

    def train_func():
        for step in range(1, 4):
            _report_step(step)
            listings.append([(os.path.basename(r.checkpoint.path), r.metrics["step"])
                             for r in trainkit.get_all_reported_checkpoints()])

    _fit(train_func, storage_path, "listing", checkpoint_config=CheckpointConfig(num_to_keep=2))
    assert listings == [
        [("checkpoint_1", 1)],
        [("checkpoint_1", 1), ("checkpoint_2", 2)],
        [("checkpoint_2", 2), ("checkpoint_3", 3)],
    ]


def test_collective_barrier_and_broadcast_work_in_local_mode(storage_path):
    out = {}

    def train_func():
        trainkit.collective.barrier()
        out["value"] = trainkit.collective.broadcast_from_rank_zero({"seed": 7, "names": ["a"]})
        trainkit.collective.barrier()

    result = _fit(train_func, storage_path, "collective")
    assert result.error is None
    assert out["value"] == {"seed": 7, "names": ["a"]}


def test_a_planted_checkpoint_folder_is_removed_on_resume_and_never_handed_out(storage_path):
    def first():
        _report_step(1)
        _report_step(2)

    _fit(first, storage_path, "planted")
    run = os.path.join(storage_path, "planted")
    for planted in ("checkpoint_99", "checkpoint_3"):
        os.makedirs(os.path.join(run, planted))
        with open(os.path.join(run, planted, "step.json"), "w") as f:
            json.dump({"step": 99}, f)
        with open(os.path.join(run, planted, "stale.bin"), "w") as f:
            f.write("half-written")

    seen = {}

    def second():
        ckpt = trainkit.get_checkpoint()
        seen["start"] = os.path.basename(ckpt.path)
        seen["listed"] = [os.path.basename(r.checkpoint.path) for r in trainkit.get_all_reported_checkpoints()]
        seen["planted_exists"] = os.path.exists(os.path.join(run, "checkpoint_99"))
        _report_step(3)

    result = _fit(second, storage_path, "planted")
    assert seen == {"start": "checkpoint_2", "listed": ["checkpoint_1", "checkpoint_2"], "planted_exists": False}
    assert _dirs_on_disk(run) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    assert sorted(os.listdir(os.path.join(run, "checkpoint_3"))) == ["step.json"]  # stale.bin is gone
    assert _step_of(result.checkpoint) == 3
    assert all("checkpoint_99" not in c.path for c, _ in Result.from_path(run).best_checkpoints)


def test_get_context_in_local_mode_describes_one_rank_of_this_run(storage_path):
    seen = {}

    def train_func():
        ctx = trainkit.get_context()
        seen.update(world_rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                    local_rank=ctx.get_local_rank(), local_world_size=ctx.get_local_world_size(),
                    node_rank=ctx.get_node_rank(), name=ctx.get_experiment_name(), attempt=ctx.get_attempt(),
                    storage=ctx.get_storage().experiment_fs_path, index0=ctx.get_report_index())
        trainkit.report({"x": 1})
        seen["index1"] = ctx.get_report_index()

    _fit(train_func, storage_path, "ctx")
    assert seen == {"world_rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1, "node_rank": 0,
                    "name": "ctx", "attempt": 1, "storage": os.path.join(storage_path, "ctx"),
                    "index0": 0, "index1": 1}


@pytest.mark.parametrize("call", [
    lambda: trainkit.report({"loss": 1.0}),
    lambda: trainkit.get_context(),
    lambda: trainkit.get_checkpoint(),
    lambda: trainkit.collective.barrier(),
])
def test_the_per_rank_api_outside_a_training_function_raises_runtime_error(call):
    with pytest.raises(RuntimeError, match="outside of a trainkit training function"):
        call()


def test_the_event_stream_records_the_run(storage_path):
    from trainkit import events as ev

    def train_func():
        if trainkit.get_context().get_attempt() == 1:
            _report_step(1)
            raise RuntimeError("first attempt dies")
        _report_step(2)

    result = _fit(train_func, storage_path, "events", failure_config=FailureConfig(max_failures=1))
    with open(os.path.join(result.path, "events.jsonl"), "rb") as f:
        read = ev.parse_events(f.read())
    assert read.bad_line is None
    types = [e.type for e in read.events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert [e.index for e in read.events if isinstance(e, ev.ReportCommitted)] == [1, 2]
    failed = [e for e in read.events if isinstance(e, ev.WorkerFailed)]
    assert len(failed) == 1 and failed[0].will_retry
    assert "first attempt dies" in failed[0].failures[0]["message"]
    assert read.events[-1].status == "finished" and read.events[-1].attempts == 2


def test_from_path_accepts_a_path_like_and_a_trailing_slash_and_rejects_a_non_run_folder(storage_path, tmp_path):
    import pathlib

    from trainkit.errors import StorageError

    def train_func():
        _report_step(1, loss=0.3)

    result = _fit(train_func, storage_path, "paths")
    for p in (pathlib.Path(result.path), result.path + "/"):
        restored = Result.from_path(p)
        assert restored.metrics == {"step": 1, "loss": 0.3}
        assert restored.checkpoint.path == result.checkpoint.path
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(StorageError, match="run_state.json"):
        Result.from_path(tmp_path / "not_a_run")
