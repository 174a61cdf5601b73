"""Ray's report() options on the ray backend (2 workers): ASYNC overlap and its durability rule under a
kill, validation, UserCallback hooks with every rank's metrics, LoggingConfig in the ranks,
get_preemption_info as a collective and PreemptionError past max_preemptions.

The durability rule (docs/api.md): an ASYNC report is acknowledged once this rank's next report(),
collective or get_all_reported_checkpoints() returned (or its function returned). A rank killed
while its ASYNC upload runs leaves the report uncommitted: the group resumes from the checkpoint
before it. Killed after the acknowledgement, the group resumes from that report's checkpoint.
Local-mode counterparts: test_report_options.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

import pytest

import trainkit
from trainkit import (Checkpoint, CheckpointUploadMode, FailureConfig, LoggingConfig, RunConfig, ScalingConfig,
                      UserCallback, ValidationConfig)
from trainkit.events import read_run_dicts
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"), pytest.mark.trainkit(workers=2, nodes=1),
              pytest.mark.timeout(240)]

WAIT_S = 60.0


def _fit(fn, tmp_path, name, *, max_failures=0, validation_config=None, **run_kwargs):
    return TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=2), validation_config=validation_config,
                        run_config=RunConfig(name=name, storage_path=str(tmp_path),
                                             failure_config=FailureConfig(max_failures=max_failures),
                                             **run_kwargs)).fit()


def _step_dir(step: int, rank: int) -> str:
    d = tempfile.mkdtemp(prefix="tk_async_")
    with open(os.path.join(d, f"rank{rank}.txt"), "w") as f:
        f.write(str(step))
    return d


def test_an_async_report_is_durable_once_acknowledged_and_lost_when_its_rank_dies_during_the_upload(tmp_path):
    seen = str(tmp_path / "seen")
    os.makedirs(seen)

    def train():
        ctx = trainkit.get_context()
        rank, attempt = ctx.get_world_rank(), ctx.get_attempt()
        ckpt = trainkit.get_checkpoint()
        start = 0
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = int(open(os.path.join(d, "rank0.txt")).read())
        open(os.path.join(seen, f"attempt{attempt}-rank{rank}-start{start}"), "w").close()
        released = threading.Event()
        went_on = []

        def upload(c, name):
            if attempt == 1 and rank == 1:
                os._exit(1)  # killed while its ASYNC upload runs: report 2 is never acknowledged
            went_on.append(released.wait(WAIT_S))  # training goes on while this upload runs
            dest = os.path.join(ctx.get_storage().experiment_fs_path, name)
            shutil.copytree(c.path, dest, dirs_exist_ok=True)
            return Checkpoint(dest)

        for step in range(start + 1, 4):
            mode = CheckpointUploadMode.ASYNC if step == 2 else CheckpointUploadMode.SYNC
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(_step_dir(step, rank)),
                            checkpoint_upload_mode=mode, checkpoint_upload_fn=upload if step == 2 else None)
            if step == 2:
                released.set()
                trainkit.collective.barrier()  # acknowledges report 2 on this rank
                assert went_on == [True]
                if attempt == 2 and rank == 1:
                    os._exit(1)  # killed after the acknowledgement: report 2 survives
        return start

    result = _fit(train, tmp_path, "durable", max_failures=2)
    assert sorted(os.listdir(seen)) == ["attempt1-rank0-start0", "attempt1-rank1-start0",
                                        "attempt2-rank0-start1", "attempt2-rank1-start1",
                                        "attempt3-rank0-start2", "attempt3-rank1-start2"]
    assert result.return_value == 2 and result.metrics == {"step": 3}
    committed = [(e["attempt"], e["index"]) for e in read_run_dicts(result.path) if e["type"] == "report_committed"]
    assert committed == [(1, 1), (2, 2), (3, 3)]
    assert sorted(os.listdir(result.checkpoint.path)) == ["rank0.txt", "rank1.txt"]


def test_callbacks_see_every_ranks_metrics_and_validations_join_checkpoint_metrics_on_the_ray_backend(tmp_path):
    calls = str(tmp_path / "calls.jsonl")

    # defined here, so that they travel to the controller and the ranks by value (the test module is
    # not importable there)
    class Calls(UserCallback):
        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(json.dumps([metrics, os.path.basename(checkpoint.path) if checkpoint else None]) + "\n")

    def _validate(checkpoint, bonus=0):
        with checkpoint.as_directory() as d:
            return {"val": int(open(os.path.join(d, "rank0.txt")).read()) + bonus}

    def train():
        rank = trainkit.get_context().get_world_rank()
        info = trainkit.get_preemption_info()
        trainkit.report({"rank": rank}, checkpoint=Checkpoint.from_directory(_step_dir(1, rank)), validation=True)
        trainkit.report({"rank": rank, "step": 2})
        listed = trainkit.get_all_reported_checkpoints()  # VALIDATED (default): after rank 0's validation
        import logging

        return {"info": info, "listed": [(r.metrics, r.status.value) for r in listed],
                "log_level": logging.getLogger("trainkit").level}

    from trainkit import ValidationTaskConfig

    result = _fit(train, tmp_path, "callbacks", callbacks=[Calls(calls)], logging_config=LoggingConfig("DEBUG"),
                  validation_config=ValidationConfig(_validate, task_config=ValidationTaskConfig({"bonus": 10})))
    assert result.return_value == {"info": None, "listed": [({"rank": 0, "val": 11}, "VALIDATED")],
                                   "log_level": 10}  # LoggingConfig reached the rank
    lines = [json.loads(line) for line in open(calls)]
    assert lines == [[[{"rank": 0}, {"rank": 1}], "checkpoint_1"],
                     [[{"rank": 0, "step": 2}, {"rank": 1, "step": 2}], None]]
    assert result.best_checkpoints[0][1] == {"rank": 0, "val": 11}


def test_get_preemption_info_names_the_noticed_rank_on_every_rank_and_past_max_preemptions_fit_raises_preemption_error(
        tmp_path):
    seen = str(tmp_path / "seen")
    os.makedirs(seen)

    def train():
        import signal

        from trainkit.session import current_session

        ctx = trainkit.get_context()
        rank = ctx.get_world_rank()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice
            assert current_session("test").preempted.wait(WAIT_S)
        info = trainkit.get_preemption_info()
        with open(os.path.join(seen, f"rank{rank}"), "w") as f:
            json.dump(info.preempted_node_to_ranks if info else None, f)
        trainkit.report({"step": 1}, checkpoint=Checkpoint.from_directory(_step_dir(1, rank)))

    with pytest.raises(trainkit.PreemptionError) as raised:
        TorchTrainer(train, scaling_config=ScalingConfig(num_workers=2),
                     run_config=RunConfig(name="preempted", storage_path=str(tmp_path),
                                          failure_config=FailureConfig(max_preemption_failures=0))).fit()
    views = [json.load(open(os.path.join(seen, f"rank{r}"))) for r in (0, 1)]
    assert views[0] == views[1] and [ranks for ranks in views[0].values()] == [[1]]
    assert raised.value.preemption_info.preempted_ranks == [1]
    assert isinstance(trainkit.Result.from_path(str(tmp_path / "preempted")).error, trainkit.PreemptionError)
