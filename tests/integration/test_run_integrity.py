"""A run is never lost or corrupted, end to end: a foreign folder is refused untouched, a damaged latest
checkpoint is skipped on resume, trainkit's own folder names cannot be checkpoint folders, a storage
that fills up ends the run with a StorageError, in local mode and on the ``ray`` backend.

Local-mode tests need no Ray (they exercise the same ledger and storage code); the ``ray`` tests share
the session's cluster (``ray_up``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

import pytest

import trainkit
from trainkit import Checkpoint, ConfigError, FailureConfig, Result, RunConfig, ScalingConfig, TrainingFailedError
from trainkit import events as ev
from trainkit.errors import StorageError
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def _resuming_steps(config):
    """Resume from step.json of the checkpoint; rank 0 saves one per step. Returns the step it resumed after."""
    ckpt = trainkit.get_checkpoint()
    start = 0
    if ckpt is not None:
        with ckpt.as_directory() as d, open(os.path.join(d, "step.json")) as f:
            start = json.load(f)["step"]
    for step in range(start + 1, config["steps"] + 1):
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if trainkit.get_context().get_world_rank() == 0:
                with open(os.path.join(d, "step.json"), "w") as f:
                    json.dump({"step": step}, f)
                with open(os.path.join(d, "model.bin"), "wb") as f:
                    f.write(b"w" * (100 * step))
                checkpoint = Checkpoint.from_directory(d)
            trainkit.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=config.get("dir_name"))
    return {"start": start}


def _fit(storage_path, name, workers, steps, *, dir_name=None, max_failures=0, **run_kwargs):
    return TorchTrainer(_resuming_steps, train_loop_config={"steps": steps, "dir_name": dir_name},
                        scaling_config=ScalingConfig(num_workers=workers),
                        run_config=RunConfig(name=name, storage_path=storage_path,
                                             failure_config=FailureConfig(max_failures=max_failures),
                                             **run_kwargs)).fit()


def _tree(root) -> dict:
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read() if os.path.isfile(p) else None
    return out


def _victim(storage_path):
    victim = os.path.join(storage_path, "victim")
    os.makedirs(os.path.join(victim, "important_data"))
    os.makedirs(os.path.join(victim, "src"))
    with open(os.path.join(victim, "important_data", "weights.bin"), "wb") as f:
        f.write(b"precious")
    with open(os.path.join(victim, "src", "main.py"), "w") as f:
        f.write("print('hi')\n")
    return victim


# -- local mode: the same ledger and storage, no Ray ------------------------------------------------
def _refuses_the_victim(storage_path, workers):
    victim = _victim(storage_path)
    before = _tree(victim)
    with pytest.raises(ConfigError, match="important_data/.*src/.*no run_state.json"):
        _fit(storage_path, "victim", workers, 2)
    assert _tree(victim) == before


def test_local_mode_refuses_a_folder_that_is_not_a_trainkit_run_and_touches_nothing(storage_path):
    _refuses_the_victim(storage_path, 0)


def test_local_mode_resumes_from_the_latest_intact_checkpoint_and_repairs_a_torn_stream(storage_path):
    _fit(storage_path, "run", 0, 3)
    run = os.path.join(storage_path, "run")
    with open(os.path.join(run, "checkpoint_3", "model.bin"), "wb") as f:
        f.write(b"short")
    with open(os.path.join(run, "events.jsonl"), "a") as f:
        f.write('{"type": "report_committed", "time": 1.0, "ind')  # a writer that died mid-line

    result = _fit(storage_path, "run", 0, 4)

    assert result.return_value == {"start": 2}
    assert result.checkpoint.path == os.path.join(run, "checkpoint_4")
    with open(os.path.join(run, "events.jsonl"), "rb") as f:
        data = f.read()
    read = ev.parse_events(data)
    # the resume repaired the stream: the torn tail is gone, every complete event read back
    assert read.bad_line is None and read.skipped == () and b'"ind\n' not in data and b'"ind{' not in data
    skipped = [e for e in read.events if isinstance(e, ev.CheckpointSkipped)]
    assert [(e.dir, e.index, e.fallback) for e in skipped] == [("checkpoint_3", 3, "checkpoint_2")]
    assert "model.bin has 5 bytes, 300 when it was committed" in skipped[0].problem
    assert [e.type for e in read.events].count("run_finished") == 2
    assert list(Result.from_path(run).metrics_dataframe["step"]) == [1, 2, 3, 4]


def test_local_mode_ends_a_run_on_a_full_disk_with_a_storage_error(tmp_path):
    from fsspec.implementations.memory import MemoryFileSystem

    class FullDisk(MemoryFileSystem):
        """Writes under checkpoint_2 fail as on a full disk."""

        protocol = ("fulldisk",)

        def __init__(self):
            super().__init__(skip_instance_cache=True)
            self.store, self.pseudo_dirs = {}, [""]

        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode and "checkpoint_2" in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return super()._open(path, mode, **kwargs)

    fs = FullDisk()
    with pytest.raises(StorageError, match="No space left on device.*ENOSPC, not retried"):
        _fit("/storage", "run", 0, 3, max_failures=-1, storage_filesystem=fs)
    state = json.loads(fs.cat_file("/storage/run/run_state.json"))
    assert state["status"] == "failed" and state["latest_checkpoint"] == "checkpoint_1"
    assert len(state["attempts"]) == 1


def test_local_mode_on_s3_records_file_sizes_and_resumes_past_a_damaged_checkpoint(s3_storage):
    first = _fit(s3_storage.path, "run", 0, 3)
    run_key = first.checkpoint.path.rsplit("/", 1)[0]
    state = json.loads(s3_storage.fs.cat_file(f"{run_key}/run_state.json"))
    assert state["checkpoints"][-1]["files"] == {"model.bin": 300, "step.json": len(json.dumps({"step": 3}))}
    s3_storage.fs.rm(f"{run_key}/checkpoint_3/model.bin")

    with pytest.warns(RuntimeWarning, match="checkpoint_3.*model.bin is missing"):
        assert Result.from_path(f"s3://{run_key}").checkpoint.path == f"{run_key}/checkpoint_2"
    second = _fit(s3_storage.path, "run", 0, 4)
    assert second.return_value == {"start": 2}
    assert second.checkpoint.path == f"{run_key}/checkpoint_4"


# -- the ray backend ------------------------------------------------------------------------------
@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=2, nodes=1)
def test_the_ray_backend_refuses_a_folder_that_is_not_a_trainkit_run_before_any_worker_starts(storage_path):
    _refuses_the_victim(storage_path, 2)


@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=2, nodes=1)
def test_the_ray_backend_resumes_from_the_latest_intact_checkpoint(storage_path):
    _fit(storage_path, "run", 2, 3)
    run = os.path.join(storage_path, "run")
    shutil.rmtree(os.path.join(run, "checkpoint_3"))

    result = _fit(storage_path, "run", 2, 4)

    assert result.return_value == {"start": 2}
    assert result.checkpoint.path == os.path.join(run, "checkpoint_4")
    events = ev.read_run(run)
    skipped = [e for e in events if isinstance(e, ev.CheckpointSkipped)]
    assert [(e.dir, e.problem, e.fallback) for e in skipped] == [("checkpoint_3", "its folder is missing",
                                                                   "checkpoint_2")]
    assert [e.start_index for e in events if isinstance(e, ev.AttemptStarted)][-1] == 2
    entry = json.loads(open(os.path.join(run, "run_state.json")).read())["checkpoints"][-1]
    assert entry["files"] == {"model.bin": 400, "step.json": len(json.dumps({"step": 4}))}


@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=2, nodes=1)
def test_a_checkpoint_named_logs_is_refused_on_the_ray_backend_and_the_rank_logs_stay(storage_path):
    with pytest.raises(TrainingFailedError, match=r"checkpoint_dir_name.*'logs'"):
        _fit(storage_path, "run", 2, 2, dir_name="logs")
    logs = os.path.join(storage_path, "run", "logs")
    assert not os.path.exists(os.path.join(logs, "step.json"))
    state = json.loads(open(os.path.join(storage_path, "run", "run_state.json")).read())
    assert state["checkpoints"] == [] and state["status"] == "failed"
