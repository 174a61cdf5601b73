"""Cases: checkpoints and retention, persistence and restore."""

from __future__ import annotations

import os

import pytest

import trainkit
from conformance.case import case
from conformance.harness import checkpoint_files, checkpoint_with, put, resume_step
from trainkit.backends.api import MULTI_WORKER

STORAGE = pytest.mark.parametrize("storage", ["local", "s3"])  # persistence cases run on local disk and moto S3

_RT_FROM_PATH_ERROR = ("Ray Train 2.60's Result.from_path of a failed run has error None: the error is not "
                       "persisted (reference §10.7).")


# -- checkpoints and retention ------------------------------------------------------------------
def _each_rank_writes(config):
    rank = trainkit.get_context().get_world_rank()
    trainkit.report({"step": 1}, checkpoint=checkpoint_with({f"rank{rank}.json": rank}))


@case("CKPT-001", "checkpoints", "Checkpoint files that several ranks report in the same round are merged into "
      "one committed checkpoint folder.", requires=[MULTI_WORKER])
def test_files_of_all_ranks_are_merged(tk):
    result = tk.fit(_each_rank_writes, workers=2)
    assert checkpoint_files(result.checkpoint) == {"rank0.json": 0, "rank1.json": 1}
    assert len(result.best_checkpoints) == 1


def _only_rank_one_checkpoints(config):
    rank = trainkit.get_context().get_world_rank()
    trainkit.report({"rank": rank}, checkpoint=checkpoint_with({"from": rank}) if rank == 1 else None)


@case("CKPT-002", "checkpoints", "A round in which only rank 1 passes a checkpoint still commits that "
      "checkpoint.", requires=[MULTI_WORKER])
def test_a_checkpoint_from_a_non_zero_rank_is_committed(tk):
    result = tk.fit(_only_rank_one_checkpoints, workers=2)
    assert checkpoint_files(result.checkpoint) == {"from": 1}


def _scored(config):
    for step, score in enumerate(config["scores"], start=1):
        metrics = {"step": step}
        if score is not None:
            metrics["score"] = score
        trainkit.report(metrics, checkpoint=checkpoint_with({"step": step}))


def _dirs_on_disk(tk, name: str, result) -> set:
    """Checkpoint folders (those holding a ``step`` file) left in the run folder."""
    run = tk.run_path(name)
    return {d for d in os.listdir(run) if os.path.isfile(os.path.join(run, d, "step"))}


def _steps(pairs) -> list:
    return [m["step"] for _, m in pairs]


@case("CKPT-003", "checkpoints", "With num_to_keep=2 and no score attribute, only the 2 newest checkpoints "
      "remain on disk; best_checkpoints lists them oldest first; Result.checkpoint is the newest.")
def test_retention_keeps_the_newest(tk):
    result = tk.fit(_scored, config={"scores": [None] * 5}, name="keep2",
                    checkpoint_config=trainkit.CheckpointConfig(num_to_keep=2))
    assert _steps(result.best_checkpoints) == [4, 5]
    assert checkpoint_files(result.checkpoint) == {"step": 5}
    assert len(_dirs_on_disk(tk, "keep2", result)) == 2


@case("CKPT-004", "checkpoints", "With num_to_keep=2 and score order 'max', the 2 best-scoring checkpoints and "
      "the latest are kept; best_checkpoints is worst to best; Result.checkpoint is the latest.")
def test_retention_by_score_max(tk):
    result = tk.fit(_scored, config={"scores": [5, 1, 3, 4, 2]}, name="keepmax",
                    checkpoint_config=trainkit.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score",
                                                                checkpoint_score_order="max"))
    assert [m["score"] for _, m in result.best_checkpoints] == [4, 5]
    assert checkpoint_files(result.checkpoint) == {"step": 5}  # the latest (score 2) is still the result
    assert len(_dirs_on_disk(tk, "keepmax", result)) == 3


@case("CKPT-005", "checkpoints", "With num_to_keep=2 and score order 'min', the 2 lowest-scoring checkpoints "
      "are kept, listed worst to best.")
def test_retention_by_score_min(tk):
    result = tk.fit(_scored, config={"scores": [5, 1, 3, 4, 2]}, name="keepmin",
                    checkpoint_config=trainkit.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score",
                                                                checkpoint_score_order="min"))
    assert [m["score"] for _, m in result.best_checkpoints] == [2, 1]
    assert len(_dirs_on_disk(tk, "keepmin", result)) == 2


@case("CKPT-006", "checkpoints", "A checkpoint whose metrics lack the score attribute ranks worst, in 'min' order "
      "as in 'max'.", extension=True,
      ray_train="Ray Train 2.60 ranks a checkpoint with a missing score attribute as the best in 'min' order "
      "(reference §20 W8, E2 keep_min).", ray_train_match=r"best_checkpoints steps: \[2")
def test_missing_score_ranks_worst(tk):
    result = tk.fit(_scored, config={"scores": [3, None, 1]},
                    checkpoint_config=trainkit.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="score",
                                                                checkpoint_score_order="min"))
    steps = _steps(result.best_checkpoints)
    assert steps == [3], f"best_checkpoints steps: {steps}, want [3] (step 2 has no score)"


def _named_dir(config):
    trainkit.report({"step": 1}, checkpoint=checkpoint_with({"step": 1}), checkpoint_dir_name="ckpt_epoch=3")


@case("CKPT-007", "checkpoints", "report(checkpoint_dir_name=N) commits the checkpoint into the folder N of the "
      "run folder.")
def test_checkpoint_dir_name_names_the_folder(tk):
    result = tk.fit(_named_dir, name="named")
    assert os.path.normpath(result.checkpoint.path) == os.path.join(tk.run_path("named"), "ckpt_epoch=3")
    assert checkpoint_files(result.checkpoint) == {"step": 1}


def _with_metadata(config):
    ckpt = checkpoint_with({"step": 1})
    ckpt.set_metadata({"epoch": 7})
    trainkit.report({"step": 1}, checkpoint=ckpt)


@case("CKPT-008", "checkpoints", "Checkpoint metadata set before report() is kept in the committed checkpoint.")
def test_checkpoint_metadata_survives_commit(tk):
    assert tk.fit(_with_metadata).checkpoint.get_metadata() == {"epoch": 7}


# -- persistence and restore -------------------------------------------------------------------
def _resumable(config):
    rank = trainkit.get_context().get_world_rank()
    start = resume_step()
    put(config["dir"], f"start-{config['run']}-rank{rank}.json", start)
    seen = [m.get("step") for m in (r.metrics for r in trainkit.get_all_reported_checkpoints())]
    put(config["dir"], f"all-{config['run']}-rank{rank}.json", seen)
    for step in range(start + 1, start + 3):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}) if rank == 0 else None)


@case("PERSIST-001", "persistence", "A fresh run's get_checkpoint() is None and get_all_reported_checkpoints() "
      "empty on every rank, even beside another run with checkpoints in the same storage_path.",
      requires=[MULTI_WORKER])
@STORAGE
def test_fresh_run_has_no_checkpoint(tk, storage):
    path = tk.storage_for(storage)
    tk.fit(_resumable, workers=2, config={"dir": tk.dir, "run": 1}, name="other", storage_path=path)
    tk.fit(_resumable, workers=2, config={"dir": tk.dir, "run": 2}, name="fresh", storage_path=path)
    for rank in (0, 1):
        assert tk.read(f"start-2-rank{rank}.json") == 0, f"rank {rank} of a fresh run got a checkpoint"
        assert tk.read(f"all-2-rank{rank}.json") == [], f"rank {rank} of a fresh run lists reported checkpoints"


@case("PERSIST-002", "persistence", "A second fit() with the same name and storage_path starts every rank from "
      "the previous run's latest checkpoint.", requires=[MULTI_WORKER])
@STORAGE
def test_rerun_resumes_from_the_latest_checkpoint(tk, storage):
    path = tk.storage_for(storage)
    tk.fit(_resumable, workers=2, config={"dir": tk.dir, "run": 1}, name="again", storage_path=path)
    result = tk.fit(_resumable, workers=2, config={"dir": tk.dir, "run": 2}, name="again", storage_path=path)
    assert tk.read("start-2-rank0.json") == 2 and tk.read("start-2-rank1.json") == 2
    assert checkpoint_files(result.checkpoint) == {"step": 4}


@case("PERSIST-003", "persistence", "In a resumed run, get_all_reported_checkpoints() lists the previous run's "
      "checkpoints, and the final best_checkpoints span both runs.")
@STORAGE
def test_resumed_run_sees_previous_checkpoints(tk, storage):
    path = tk.storage_for(storage)
    tk.fit(_resumable, config={"dir": tk.dir, "run": 1}, name="span", storage_path=path)
    result = tk.fit(_resumable, config={"dir": tk.dir, "run": 2}, name="span", storage_path=path)
    assert tk.read("all-2-rank0.json") == [1, 2]
    assert [m["step"] for _, m in result.best_checkpoints] == [1, 2, 3, 4]


@case("PERSIST-004", "persistence", "Result.from_path(result.path) rebuilds the same checkpoint, metrics and "
      "best checkpoints as the live Result, without error.")
@STORAGE
def test_result_from_path_matches_the_live_result(tk, storage):
    path = tk.storage_for(storage)
    live = tk.fit(_resumable, config={"dir": tk.dir, "run": 1}, storage_path=path)
    loaded = tk.result_from_path(tk.uri_of(path, live.path))  # on S3 result.path has no scheme (as in Ray Train)
    assert loaded.error is None
    assert os.path.normpath(loaded.checkpoint.path) == os.path.normpath(live.checkpoint.path)
    assert loaded.metrics == live.metrics
    assert [m for _, m in loaded.best_checkpoints] == [m for _, m in live.best_checkpoints]


def _fails_after_two(config):
    trainkit.report({"step": 1}, checkpoint=checkpoint_with({"step": 1}))
    raise RuntimeError("failure after step 1")


@case("PERSIST-005", "persistence", "After a failed run, Result.from_path(run folder) has the same error as "
      "fit() raised, and the last committed checkpoint.", extension=True, ray_train=_RT_FROM_PATH_ERROR,
      ray_train_match="from_path error is None")
@STORAGE
def test_result_from_path_of_a_failed_run_has_the_error(tk, storage):
    path = tk.storage_for(storage)
    err = tk.fails(_fails_after_two, name="failed", storage_path=path)
    loaded = tk.result_from_path(tk.run_path("failed", path))
    assert isinstance(loaded.error, trainkit.TrainingFailedError), f"Result.from_path error is {loaded.error!r}"
    assert "failure after step 1" in str(loaded.error) and "failure after step 1" in str(err)
    assert checkpoint_files(loaded.checkpoint) == {"step": 1}
