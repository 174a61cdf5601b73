"""Ray's report() options and the names behind them, in local mode (num_workers=0) and on the ray backend.

``checkpoint_upload_mode`` SYNC / ASYNC / NO_UPLOAD, ``delete_local_checkpoint_after_upload``,
``checkpoint_upload_fn``, ``validation`` with the trainer's ``ValidationConfig``, ``UserCallback``
hooks, ``LoggingConfig`` and ``get_preemption_info``. Where a test must show that two things
overlap (training goes on while an ASYNC upload or a validation runs), the background side
waits on an event that only the training side sets after ``report()`` returned: a
``report()`` that waited for the upload would never return (the wait's bound then fails the
test), so no timing is assumed.

The ASYNC durability rule (docs/api.md): an ASYNC report is acknowledged once this rank's next
``report()``, collective or ``get_all_reported_checkpoints()`` returned, or its function
returned; a rank killed before that resumes from the checkpoint before it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading

import pytest

import trainkit
from trainkit import (Checkpoint, CheckpointConsistencyMode, CheckpointUploadMode, ConfigError, FailureConfig,
                      LoggingConfig, ReportedCheckpointStatus, RunConfig, ScalingConfig, UserCallback,
                      ValidationConfig, ValidationTaskConfig)
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 60.0  # bound of a wait on the other side: reached only when the behaviour is wrong


def _fit(fn, tmp_path, name="run", *, workers=0, validation_config=None, max_failures=0, **run_kwargs):
    _GATES.clear()  # the trainer pickles the function (and this module's globals with it): no Event then
    return TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=workers), validation_config=validation_config,
                        run_config=RunConfig(name=name, storage_path=str(tmp_path),
                                             failure_config=FailureConfig(max_failures=max_failures),
                                             **run_kwargs)).fit()


def _checkpoint_dir(step: int, **files) -> str:
    d = tempfile.mkdtemp(prefix="tk_report_opts_")
    with open(os.path.join(d, "step.txt"), "w") as f:
        f.write(str(step))
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return d


def _copy_upload(ckpt: Checkpoint, name: str) -> Checkpoint:
    """A checkpoint_upload_fn: copy the folder to the run folder's ``name`` and say where it went."""
    dest = os.path.join(trainkit.get_context().get_storage().experiment_fs_path, name)
    shutil.copytree(ckpt.path, dest, dirs_exist_ok=True)
    return Checkpoint(dest)


# -- ASYNC ------------------------------------------------------------------------------------------
def test_an_async_report_returns_before_its_upload_ends_and_training_goes_on_meanwhile(tmp_path):
    def train():
        released = threading.Event()
        seen = {}

        def slow_upload(ckpt, name):
            seen["training_went_on"] = released.wait(WAIT_S)  # set only after report() returned
            return _copy_upload(ckpt, name)

        trainkit.report({"step": 1}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(1)),
                        checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=slow_upload)
        seen["before_commit"] = trainkit.get_checkpoint()  # still the previous one: nothing committed yet
        released.set()  # training goes on while the upload runs
        listed = trainkit.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED)  # waits for the commit
        return {"went_on": seen["training_went_on"], "before": seen["before_commit"],
                "listed": [os.path.basename(r.checkpoint.path) for r in listed],
                "after": os.path.basename(trainkit.get_checkpoint().path)}

    result = _fit(train, tmp_path)
    assert result.return_value == {"went_on": True, "before": None, "listed": ["checkpoint_1"],
                                   "after": "checkpoint_1"}
    with result.checkpoint.as_directory() as d:
        assert open(os.path.join(d, "step.txt")).read() == "1"


def test_async_deletes_the_local_folder_after_the_upload_by_default_and_sync_keeps_it(tmp_path):
    dirs = {m: _checkpoint_dir(1) for m in ("SYNC", "ASYNC", "ASYNC_KEEP")}

    def train():
        trainkit.report({"s": 1}, checkpoint=Checkpoint.from_directory(dirs["SYNC"]))
        trainkit.report({"s": 2}, checkpoint=Checkpoint.from_directory(dirs["ASYNC"]),
                        checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        trainkit.report({"s": 3}, checkpoint=Checkpoint.from_directory(dirs["ASYNC_KEEP"]),
                        checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=False)

    result = _fit(train, tmp_path)
    assert os.path.isdir(dirs["SYNC"]) and not os.path.exists(dirs["ASYNC"]) and os.path.isdir(dirs["ASYNC_KEEP"])
    assert [os.path.basename(c.path) for c, _ in result.best_checkpoints] == [
        "checkpoint_1", "checkpoint_2", "checkpoint_3"]
    assert all(os.path.isfile(os.path.join(c.path, "step.txt")) for c, _ in result.best_checkpoints)


def test_an_async_upload_that_fails_fails_the_attempt_at_the_next_report(tmp_path):
    def train():
        def broken(ckpt, name):
            raise OSError("the bucket is gone")

        trainkit.report({"s": 1}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(1)),
                        checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=broken)
        trainkit.report({"s": 2})

    with pytest.raises(trainkit.WorkerGroupError, match="the bucket is gone"):
        _fit(train, tmp_path)


# -- NO_UPLOAD and checkpoint_upload_fn ----------------------------------------------------------------
def test_no_upload_commits_a_folder_already_in_the_run_folder_and_refuses_one_outside(tmp_path):
    def train():
        run = trainkit.get_context().get_storage().experiment_fs_path
        os.makedirs(os.path.join(run, "mine"))
        with open(os.path.join(run, "mine", "w.txt"), "w") as f:
            f.write("x")
        trainkit.report({"s": 1}, checkpoint=Checkpoint(os.path.join(run, "mine")),
                        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        try:
            trainkit.report({"s": 2}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(2)),
                            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        except ConfigError as e:
            return str(e)

    result = _fit(train, tmp_path)
    assert "outside the experiment directory" in result.return_value
    assert os.path.basename(result.checkpoint.path) == "mine"
    assert os.path.isfile(os.path.join(result.checkpoint.path, "w.txt"))


def test_a_checkpoint_upload_fn_uploads_itself_and_must_return_the_folder_it_was_given(tmp_path):
    def train():
        trainkit.report({"s": 1}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(1)),
                        checkpoint_upload_fn=_copy_upload)
        try:
            trainkit.report({"s": 2}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(2)),
                            checkpoint_upload_fn=lambda ckpt, name: ckpt)  # says it stayed where it was
        except ConfigError as e:
            return str(e)

    result = _fit(train, tmp_path)
    assert "checkpoint_upload_fn" in result.return_value
    assert os.path.basename(result.checkpoint.path) == "checkpoint_1"


def test_report_refuses_what_ray_refuses(tmp_path):
    def train():
        out = {}
        with pytest.raises(TypeError):
            trainkit.report({"s": 1}, not_a_ray_option=True)
        with pytest.raises(ValueError, match="Validation requires a checkpoint"):
            trainkit.report({"s": 1}, validation=True)
        with pytest.raises(ValueError, match="validation_config"):
            trainkit.report({"s": 1}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(1)), validation=True)
        with pytest.raises(ConfigError, match="checkpoint_upload_mode"):
            trainkit.report({"s": 1}, checkpoint_upload_mode="SOMETIMES")
        out["ok"] = True
        return out

    assert _fit(train, tmp_path).return_value == {"ok": True}


# -- validation -----------------------------------------------------------------------------------------
_GATES: dict = {}
_DONE: dict = {}


def _gate(name: str) -> threading.Event:
    """An event of this process by name (local mode runs the function and its validations here; an
    Event itself cannot travel in a function that the trainer checks for pickling)."""
    return _GATES.setdefault(name, threading.Event())


def _done(name: str) -> list:
    return _DONE.setdefault(name, [])


def _validate_fn(name: str):
    """``_gate(name)`` is set by the training function after report() returned; a validation that
    blocked training would wait here for good (bounded)."""
    def validate(checkpoint, scale=1):
        went_on = _gate(name).wait(WAIT_S)
        with checkpoint.as_directory() as d:
            step = int(open(os.path.join(d, "step.txt")).read())  # its folder is still there
        _done(name).append(step)
        if step == 3:
            raise RuntimeError("this one does not validate")
        return {"val_score": step * scale, "trained_on": went_on}

    return validate


def test_validation_runs_on_committed_checkpoints_without_blocking_training_and_joins_their_metrics(tmp_path):
    name = "joins"

    def train():
        gate = _gate(name)
        for step in (1, 2, 3):
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(step)),
                            validation=ValidationTaskConfig(fn_kwargs={"scale": 10}) if step == 2 else True)
            if step == 1:
                gate.set()  # training went on past report 1 while its validation waits
        listed = trainkit.get_all_reported_checkpoints()  # VALIDATED: waits for the validations
        return [(r.metrics, r.status.value) for r in listed]

    result = _fit(train, tmp_path, validation_config=ValidationConfig(_validate_fn(name)))
    assert _done(name) == [1, 2, 3]
    assert result.return_value == [
        ({"step": 1, "val_score": 1, "trained_on": True}, "VALIDATED"),
        ({"step": 2, "val_score": 20, "trained_on": True}, "VALIDATED"),
        ({"step": 3}, "VALIDATION_FAILED"),
    ]
    assert [m for _, m in result.best_checkpoints][0] == {"step": 1, "val_score": 1, "trained_on": True}
    back = trainkit.Result.from_path(result.path)
    assert [m.get("val_score") for _, m in back.best_checkpoints] == [1, 20, None]


def test_a_validation_score_ranks_checkpoints_and_a_pending_one_is_not_deleted(tmp_path):
    name = "pending"

    def train():
        for step in (1, 2):
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(step)),
                            validation=True)
        _gate(name).set()
        return [r.status.value for r in trainkit.get_all_reported_checkpoints()]

    from trainkit import CheckpointConfig

    result = _fit(train, tmp_path, validation_config=ValidationConfig(_validate_fn(name)),
                  checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_score"))
    # checkpoint_1 was pending (no val_score: ranked worst) when report 2 committed, and was kept for its
    # validation, which read it; validated, the best (and latest) one stays
    assert _done(name) == [1, 2] and result.return_value == ["VALIDATED"]
    assert sorted(os.path.basename(c.path) for c, _ in result.best_checkpoints) == ["checkpoint_2"]
    assert os.path.isdir(os.path.join(result.path, "checkpoint_2"))


# -- callbacks, logging, preemption info -------------------------------------------------------------------
class Recorder(UserCallback):
    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(f"report {metrics} {os.path.basename(checkpoint.path) if checkpoint else None} "
                    f"{run_context.get_run_config().name}\n")

    def after_exception(self, run_context, worker_exceptions):
        with open(self.path, "a") as f:
            f.write("exception " + " ".join(f"{r}:{e.exc_type}" for r, e in sorted(worker_exceptions.items())) + "\n")


def test_user_callback_hooks_are_called_after_each_report_and_after_a_failure(tmp_path):
    log = str(tmp_path / "calls.txt")
    marker = str(tmp_path / "failed_once")

    def train():
        trainkit.report({"a": 1})
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise KeyError("once")
        trainkit.report({"a": 2}, checkpoint=Checkpoint.from_directory(_checkpoint_dir(2)))

    _fit(train, tmp_path, name="cb", max_failures=1, callbacks=[Recorder(log)])
    assert open(log).read().splitlines() == [
        "report [{'a': 1}] None cb", "exception 0:KeyError", "report [{'a': 1}] None cb",
        "report [{'a': 2}] checkpoint_2 cb"]


def test_logging_config_sets_trainkits_log_level_in_the_training_function(tmp_path):
    logger = logging.getLogger("trainkit")
    before = logger.level
    try:
        result = _fit(lambda: logging.getLogger("trainkit").level, tmp_path,
                      logging_config=LoggingConfig(log_level="debug"))
        assert result.return_value == logging.DEBUG
    finally:
        logger.setLevel(before)
    with pytest.raises(ConfigError, match="LoggingConfig.log_level"):
        LoggingConfig(log_level="LOUD")


def test_get_preemption_info_is_none_without_a_notice(tmp_path):
    assert _fit(trainkit.get_preemption_info, tmp_path).return_value is None


# -- torchrun ----------------------------------------------------------------------------------------------
TORCHRUN_SCRIPT = '''
import json, os, sys, tempfile, threading
import trainkit
from trainkit import Checkpoint, CheckpointUploadMode, RunConfig, ScalingConfig, UserCallback, ValidationConfig
from trainkit.torch import TorchTrainer


class Calls(UserCallback):
    def __init__(self, path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps([metrics, checkpoint is not None]) + "\\n")


def validate(checkpoint):
    with checkpoint.as_directory() as d:
        return {"files": sorted(os.listdir(d))}


def train():
    rank = trainkit.get_context().get_world_rank()
    released = threading.Event()
    went_on = []
    d = tempfile.mkdtemp()
    open(os.path.join(d, f"rank{rank}.txt"), "w").close()

    def upload(ckpt, name):
        went_on.append(released.wait(60))
        dest = os.path.join(trainkit.get_context().get_storage().experiment_fs_path, name)
        import shutil
        shutil.copytree(ckpt.path, dest, dirs_exist_ok=True)
        return Checkpoint(dest)

    trainkit.report({"rank": rank}, checkpoint=Checkpoint.from_directory(d),
                    checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=upload, validation=True)
    released.set()
    listed = trainkit.get_all_reported_checkpoints()
    return {"went_on": went_on, "local_deleted": not os.path.exists(d), "info": trainkit.get_preemption_info(),
            "listed": [(r.metrics, r.status.value) for r in listed]}


storage, calls = sys.argv[1:3]
result = TorchTrainer(train, scaling_config=ScalingConfig(num_workers=0), validation_config=ValidationConfig(validate),
                      run_config=RunConfig(name="tr", storage_path=storage, callbacks=[Calls(calls)])).fit()
print("TKJSON " + json.dumps({"rank": int(os.environ["RANK"]), "value": result.return_value}), flush=True)
'''


def test_async_validation_and_callbacks_under_torchrun(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    calls = tmp_path / "calls.jsonl"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={port}", str(script),
                           str(tmp_path / "storage"), str(calls)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted((json.loads(line.split("TKJSON ", 1)[1]) for line in proc.stdout.splitlines() if "TKJSON" in line),
                   key=lambda line: line["rank"])
    listed = [[{"rank": 0, "files": ["rank0.txt", "rank1.txt"]}, "VALIDATED"]]
    assert [line["value"] for line in lines] == [
        {"went_on": [True], "local_deleted": True, "info": None, "listed": listed}] * 2
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [[[{"rank": 0}, {"rank": 1}], True]]
