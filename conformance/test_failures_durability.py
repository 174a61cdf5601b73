"""Cases: failures and retries, and durability (a committed checkpoint is never lost).

Failures are injected inside the training function (raise, or ``os._exit`` for a process
death) on a given attempt, counted with a marker file, so they work on every backend.
A process death needs separate worker processes: those cases require multi_worker.
"""

from __future__ import annotations

import os

import pytest

import trainkit
from conformance.case import case
from conformance.harness import checkpoint_with, count_attempt, put, resume_step
from trainkit.backends.api import DURABLE_REPORT, MULTI_WORKER

STORAGE = pytest.mark.parametrize("storage", ["local", "s3"])  # durability cases run on local disk and moto S3


def _raise_on(config):
    ctx = trainkit.get_context()
    attempt = count_attempt(config["dir"], ctx.get_world_rank())
    if ctx.get_world_rank() == config.get("rank", 0) and attempt in config["fail_on"]:
        raise ValueError(f"injected failure on attempt {attempt}")
    return attempt


# -- failures and retries --------------------------------------------------------------------
@case("FAIL-001", "failures", "An exception on one rank fails the run with TrainingFailedError whose "
      "worker_failures names that rank and whose message carries the original error text.",
      requires=[MULTI_WORKER])
def test_user_exception_fails_the_run_naming_the_rank(tk):
    err = tk.fails(_raise_on, workers=2, config={"dir": tk.dir, "rank": 1, "fail_on": [1]})
    assert isinstance(err, trainkit.WorkerGroupError)
    assert 1 in err.worker_failures
    assert "injected failure on attempt 1" in str(err)


@case("FAIL-002", "failures", "With max_failures=0 a failing function runs exactly once and fit() raises "
      "TrainingFailedError.")
def test_no_retry_by_default(tk):
    tk.fails(_raise_on, config={"dir": tk.dir, "fail_on": [1, 2, 3]})
    assert len(tk.lines("starts-rank0")) == 1


@case("FAIL-003", "failures", "With max_failures=2 a function that always fails runs exactly 3 times, then "
      "fit() raises.")
def test_retries_are_bounded(tk):
    tk.fails(_raise_on, config={"dir": tk.dir, "fail_on": [1, 2, 3, 4]}, max_failures=2)
    assert len(tk.lines("starts-rank0")) == 3


@case("FAIL-004", "failures", "With max_failures=-1 a function that fails on its first 3 attempts succeeds on "
      "the 4th.")
def test_unlimited_retries(tk):
    result = tk.fit(_raise_on, config={"dir": tk.dir, "fail_on": [1, 2, 3]}, max_failures=-1)
    assert result.return_value == 4


def _fail_after_step(config):
    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    start = resume_step()
    put(config["dir"], f"start-a{attempt}-rank{rank}.json", start)
    for step in range(start + 1, 5):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}) if rank == 0 else None)
        if config.get("barrier"):
            trainkit.collective.barrier()
        if attempt == 1 and step == 2 and rank == config["rank"]:
            raise ValueError("injected failure after step 2")


@case("FAIL-005", "failures", "After a failure with retries left, every rank restarts from the latest committed "
      "checkpoint and the run finishes.", requires=[MULTI_WORKER])
def test_restart_resumes_every_rank_from_the_latest_checkpoint(tk):
    result = tk.fit(_fail_after_step, workers=2, config={"dir": tk.dir, "rank": 1, "barrier": True},
                    max_failures=1)
    assert tk.read("start-a2-rank0.json") == 2 and tk.read("start-a2-rank1.json") == 2
    assert result.metrics["step"] == 4


def _dies(config):
    ctx = trainkit.get_context()
    trainkit.report({"step": 1})
    if ctx.get_world_rank() == 1:
        os._exit(1)
    trainkit.report({"step": 2})


@case("FAIL-006", "failures", "A rank whose process dies (os._exit) fails the run with TrainingFailedError "
      "whose worker_failures names that rank.", requires=[MULTI_WORKER])
def test_process_death_fails_the_run_naming_the_rank(tk):
    err = tk.fails(_dies, workers=2)
    assert 1 in err.worker_failures, f"rank 1 died but worker_failures has {sorted(err.worker_failures)}"


@case("FAIL-007", "failures", "A single-rank run that fails once with max_failures=1 restarts from its latest "
      "checkpoint and finishes.")
def test_single_rank_restart_resumes(tk):
    result = tk.fit(_fail_after_step, config={"dir": tk.dir, "rank": 0}, max_failures=1)
    assert tk.read("start-a2-rank0.json") == 2
    assert result.metrics["step"] == 4


class _RaisingCallback(trainkit.UserCallback):
    """A UserCallback whose after_report raises at the first committed report."""

    def after_report(self, run_context, metrics, checkpoint):
        raise RuntimeError("injected callback failure")


def _counted_reports(config):
    count_attempt(config["dir"], trainkit.get_context().get_world_rank())
    for step in (1, 2, 3):
        trainkit.report({"step": step})


@case("FAIL-008", "failures", "An exception in a UserCallback hook fails the run at once with ControllerError "
      "naming the callback's exception, and is not retried even with max_failures=2: every rank started once.")
def test_a_callback_exception_is_fatal_and_not_retried(tk):
    workers = 2 if MULTI_WORKER in tk.capabilities else 1
    err = tk.fails(_counted_reports, workers=workers, config={"dir": tk.dir}, max_failures=2,
                   run_options={"callbacks": [_RaisingCallback()]})
    assert isinstance(err, trainkit.ControllerError), f"{type(err).__name__}, not ControllerError: {err.message}"
    assert any(f.exc_type == "RuntimeError" and "injected callback failure" in f.message for f in err.failures), \
        [(f.exc_type, f.message[:200]) for f in err.failures]
    starts = {r: len(tk.lines(f"starts-rank{r}")) for r in range(workers)}
    assert starts == {r: 1 for r in range(workers)}, f"starts per rank: {starts} (a callback's error was retried)"


# -- durability --------------------------------------------------------------------------------
def _dies_after_report(config):
    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    start = resume_step()
    put(config["dir"], f"start-a{attempt}-rank{rank}.json", start)
    for step in range(start + 1, 4):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}) if rank == 0 else None)
        if attempt == 1 and step == 2 and rank == 1:
            os._exit(1)  # right after report() returned on this rank


_RT_LOST_ROUNDS = ("Ray Train 2.60 can lose rounds whose reports were still queued in the dead worker (one report "
                   "per worker per controller poll, no flush before the failure is handled): in one run of this "
                   "suite on a loaded machine the restarted group resumed from step 0 although report(step 1) had "
                   "returned on every rank; on a quiet machine it resumed from step 1 or 2 (a race; "
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1; reference §5.5, W1).")


@case("DUR-001", "durability", "When a rank dies right after report(step k) returned, the restarted group "
      "resumes from step k or k-1 (never older), and the run finishes.", requires=[MULTI_WORKER],
      ray_train=_RT_LOST_ROUNDS, ray_train_match="resumed from step 0", ray_train_racy=True)
@STORAGE
def test_death_after_report_resumes_from_k_or_k_minus_one(tk, storage):
    result = tk.fit(_dies_after_report, workers=2, config={"dir": tk.dir}, max_failures=1,
                    storage_path=tk.storage_for(storage))
    start = tk.read("start-a2-rank0.json")
    assert start in (1, 2), f"the restarted group resumed from step {start} after report(2) returned"
    assert result.metrics["step"] == 3


@case("DUR-002", "durability", "A checkpoint is never lost once report() returned on any rank: a rank dying "
      "right after report(step k) returned resumes the group from step k.",
      requires=[MULTI_WORKER, DURABLE_REPORT], extension=True,
      ray_train="Ray Train 2.60 drops a round whose reports were still in a dead worker's queue: the group "
      "resumes from step k-1 (or older) and step k's folder is left orphaned; a race, so sometimes step k is kept "
      "(reference §5.5, W1, E2 lost_report).", ray_train_match="was lost", ray_train_racy=True)
@STORAGE
def test_death_after_report_never_loses_the_checkpoint(tk, storage):
    tk.fit(_dies_after_report, workers=2, config={"dir": tk.dir}, max_failures=1,
           storage_path=tk.storage_for(storage))
    start = tk.read("start-a2-rank0.json")
    assert start == 2, f"the checkpoint of a report that returned was lost: resumed from step {start}"


def _dies_before_report(config):
    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    start = resume_step()
    put(config["dir"], f"start-a{attempt}-rank{rank}.json", start)
    for step in range(start + 1, 4):
        if attempt == 1 and step == 2 and rank == 1:
            os._exit(1)  # rank 0 is inside report(step 2) with its checkpoint already uploaded
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}) if rank == 0 else None)


@case("DUR-003", "durability", "A checkpoint of a round that not every rank reached is never handed out: after "
      "a rank dies before report(step k), every rank restarts from a step before k.", requires=[MULTI_WORKER])
@STORAGE
def test_incomplete_round_is_not_handed_out(tk, storage):
    result = tk.fit(_dies_before_report, workers=2, config={"dir": tk.dir}, max_failures=1,
                    storage_path=tk.storage_for(storage))
    starts = [tk.read("start-a2-rank0.json"), tk.read("start-a2-rank1.json")]
    assert starts[0] == starts[1] and starts[0] < 2, f"restart steps {starts}: the incomplete round 2 was handed out"
    assert result.metrics["step"] == 3


@case("DUR-006", "durability", "After a rank dies before report(step k), the restarted group resumes from step "
      "k-1, whose report had returned on every rank.", requires=[MULTI_WORKER, DURABLE_REPORT], extension=True,
      ray_train=_RT_LOST_ROUNDS, ray_train_match="resumed from", ray_train_racy=True)
@STORAGE
def test_round_before_an_incomplete_one_is_kept(tk, storage):
    tk.fit(_dies_before_report, workers=2, config={"dir": tk.dir}, max_failures=1,
           storage_path=tk.storage_for(storage))
    starts = [tk.read("start-a2-rank0.json"), tk.read("start-a2-rank1.json")]
    assert starts == [1, 1], f"the restarted ranks resumed from steps {starts}, not step 1"


def _fails_always_after(config):
    start = resume_step()
    put(config["dir"], f"start-run{config['run']}.json", start)
    for step in range(start + 1, start + 3):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}))
        trainkit.collective.barrier()
    if config.get("fail"):
        raise ValueError("the run fails after its reports")


@case("DUR-004", "durability", "A new fit() with the same name after a failed run resumes from the failed "
      "run's last committed checkpoint.")
@STORAGE
def test_new_fit_after_a_failed_run_resumes(tk, storage):
    path = tk.storage_for(storage)
    tk.fails(_fails_always_after, config={"dir": tk.dir, "run": 1, "fail": True}, name="durable", storage_path=path)
    tk.fit(_fails_always_after, config={"dir": tk.dir, "run": 2}, name="durable", storage_path=path)
    start = tk.read("start-run2.json")
    assert start == 2, f"the new fit() resumed from step {start}, not the failed run's last checkpoint (2)"


@case("DUR-005", "durability", "The run folder's events.jsonl records the run's start, every committed report "
      "in order, and its end.", extension=True,
      ray_train="Ray Train 2.60 writes no event stream to storage; its logs go to the Ray session folder "
      "(reference §4.2.5).", ray_train_raises=FileNotFoundError, ray_train_match="events.jsonl")
@STORAGE
def test_event_stream_records_the_run(tk, storage):
    import json

    path = tk.storage_for(storage)
    tk.fit(_fails_always_after, config={"dir": tk.dir, "run": 1}, name="events", storage_path=path)
    fs, root = tk.fs_for(path)  # the run folder is read through the storage's own filesystem
    events = f"{root}/events/events.jsonl"
    if not fs.isfile(events):
        raise FileNotFoundError(f"no events.jsonl in the run folder: {events}")
    with fs.open(events, "r") as f:
        types = [json.loads(line) for line in f if line.strip()]
    kinds = [e["type"] for e in types]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert [e["index"] for e in types if e["type"] == "report_committed"] == [1, 2]
