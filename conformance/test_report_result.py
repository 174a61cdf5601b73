"""Cases: the report barrier, and metrics and Result."""

from __future__ import annotations

import os
import re
import time

import pytest

import trainkit
from conformance.case import case
from conformance.harness import checkpoint_files, checkpoint_with, count_attempt, put
from trainkit.backends.api import MULTI_WORKER

_RT_METRICS = ("Ray Train 2.60's Result.metrics is the metrics of the latest *checkpointed* report: metrics-only "
               "reports are not reflected and a run without checkpoints has metrics None (reference §10.2, E1, E2).")


# -- report barrier ------------------------------------------------------------------------------
def _barrier_timing(config):
    rank = trainkit.get_context().get_world_rank()
    if rank == 1:
        time.sleep(config["delay_s"])  # the stimulus: rank 1 arrives late
        put(config["dir"], "rank1-arrives.json", time.time())
    trainkit.report({"rank": rank})
    put(config["dir"], f"returned-{rank}.json", time.time())


@case("REPORT-001", "report", "report() returns on a rank only after every rank of the group has called it.",
      requires=[MULTI_WORKER])
def test_report_returns_only_after_every_rank_arrived(tk):
    tk.fit(_barrier_timing, workers=2, config={"dir": tk.dir, "delay_s": 1.0})
    arrived = tk.read("rank1-arrives.json")
    assert tk.read("returned-0.json") >= arrived, "rank 0's report() returned before rank 1 called report()"


def _reports_with_rank_metrics(config):
    rank = trainkit.get_context().get_world_rank()
    trainkit.report({"rank": rank, "k": 1}, checkpoint=checkpoint_with({f"r{rank}": rank}))


@case("REPORT-002", "report", "The metrics of a report round are rank 0's metrics; other ranks' metrics are "
      "not mixed in.", requires=[MULTI_WORKER])
def test_round_metrics_are_rank_zero_metrics(tk):
    assert tk.fit(_reports_with_rank_metrics, workers=2).metrics == {"rank": 0, "k": 1}


_RT_MISMATCH_HANG = ("Ray Train 2.60 hangs when ranks call report() a different number of times: the rank still "
                     "in report() waits forever (no default collective timeout; only RAY_TRAIN_COLLECTIVE_TIMEOUT_S "
                     "ends it), so the case's bound ends the run (reference §7.6, W4, E2 mismatch).")
_RT_CROSSTALK = ("Ray Train 2.60 pairs report() on one rank with a collective on another silently (one unsequenced "
                 "barrier): fit() returns, the collective returns the report's checkpoint dir name and the round "
                 "is dropped (reference §7.2.2, W5, E9).")


def _mismatch(config):
    """Rank 1 calls config['rank1'] (a list of operations), the other ranks config['rank0']."""
    rank = trainkit.get_context().get_world_rank()
    count_attempt(config["dir"], rank)
    for op in config["rank1" if rank == 1 else "rank0"]:
        if op == "report":
            trainkit.report({"rank": rank})
        elif op == "barrier":
            trainkit.collective.barrier()
        else:
            trainkit.collective.broadcast_from_rank_zero({"from": rank})


def _mismatch_failure(tk, err, *words: str):
    """The failure record naming the mismatch; checked on its fields (never the traceback text, whose
    function names already hold the words), and the run was not retried although max_failures=2."""
    failures = [f for f in getattr(err, "failures", []) if f.kind == "mismatch"]
    assert failures, (f"the run failed, but not of a mismatch: failure kinds "
                      f"{[(f.kind, f.exc_type, f.message[:120]) for f in getattr(err, 'failures', [])]}")
    f = failures[0]
    for w in words:
        assert w in f.message, f"the mismatch error does not say {w!r}: {f.message}"
    starts = len(tk.lines("starts-rank0"))
    assert starts == 1, f"a mismatch was retried: rank 0 started {starts} times with max_failures=2"
    return f


@case("REPORT-003", "report", "A rank that calls report() more times than the others ends the run at once with a "
      "mismatch error that says 'report' and names the rank that returned and its report count, not retried.",
      requires=[MULTI_WORKER], extension=True, bound_s=90, ray_train=_RT_MISMATCH_HANG,
      ray_train_raises="CaseTimeout")
def test_a_rank_reporting_more_times_fails_fast(tk):
    err = tk.fails(_mismatch, workers=2, max_failures=2,
                   config={"dir": tk.dir, "rank0": ["report"] * 2, "rank1": ["report"] * 3})
    f = _mismatch_failure(tk, err, "report", "rank 0")
    assert re.search(r"\b2\b", f.message), f"the error does not give rank 0's report count (2): {f.message}"


@case("REPORT-008", "report", "A rank that calls report() fewer times than the others ends the run at once with a "
      "mismatch error that says 'report' and names the rank that returned and its report count, not retried.",
      requires=[MULTI_WORKER], extension=True, bound_s=90, ray_train=_RT_MISMATCH_HANG,
      ray_train_raises="CaseTimeout")
def test_a_rank_reporting_fewer_times_fails_fast(tk):
    err = tk.fails(_mismatch, workers=2, max_failures=2,
                   config={"dir": tk.dir, "rank0": ["report"] * 3, "rank1": ["report"]})
    f = _mismatch_failure(tk, err, "report", "rank 1")
    assert re.search(r"\b1 report", f.message), f"the error does not give rank 1's report count (1): {f.message}"


@case("REPORT-004", "report", "A barrier() on one rank never pairs with a report() on another: the run fails at "
      "once with a mismatch error naming both operations, not retried.", requires=[MULTI_WORKER], extension=True,
      bound_s=90, ray_train=_RT_CROSSTALK, ray_train_match=r"fit\(\) returned")
def test_report_never_pairs_with_a_barrier(tk):
    err = tk.fails(_mismatch, workers=2, max_failures=2,
                   config={"dir": tk.dir, "rank0": ["report"], "rank1": ["barrier"]})
    _mismatch_failure(tk, err, "report", "barrier")


@case("REPORT-009", "report", "A broadcast_from_rank_zero() on one rank never pairs with a report() on another: "
      "the run fails at once with a mismatch error naming both operations, not retried.",
      requires=[MULTI_WORKER], extension=True, bound_s=90, ray_train=_RT_CROSSTALK,
      ray_train_match=r"fit\(\) returned")
def test_report_never_pairs_with_a_broadcast(tk):
    err = tk.fails(_mismatch, workers=2, max_failures=2,
                   config={"dir": tk.dir, "rank0": ["report"], "rank1": ["broadcast"]})
    _mismatch_failure(tk, err, "report", "broadcast")


def _tensor_metrics(config):
    import torch

    try:
        trainkit.report({"loss": torch.tensor(1.0)})
    except ValueError as e:
        return f"rejected: {e}"
    return "accepted"


@case("REPORT-005", "report", "report() with a torch tensor in its metrics raises ValueError in the rank.")
def test_report_rejects_tensor_metrics(tk):
    assert tk.fit(_tensor_metrics).return_value.startswith("rejected")


def _checkpoint_visible_after_report(config):
    trainkit.report({"step": 1}, checkpoint=checkpoint_with({"step": 1}))
    seen = checkpoint_files(trainkit.get_checkpoint())
    put(config["dir"], f"seen-{trainkit.get_context().get_world_rank()}.json", seen)


@case("REPORT-006", "report", "Once report(checkpoint) returns, get_checkpoint() on that rank is the committed "
      "checkpoint just reported.")
def test_get_checkpoint_after_report_is_the_reported_checkpoint(tk):
    tk.fit(_checkpoint_visible_after_report, config={"dir": tk.dir})
    assert tk.read("seen-0.json") == {"step": 1}, "get_checkpoint() after report() is not the reported checkpoint"


def _metrics_only_keeps_checkpoint(config):
    trainkit.report({"step": 1}, checkpoint=checkpoint_with({"step": 1}))
    trainkit.report({"step": 2})
    put(config["dir"], "seen.json", checkpoint_files(trainkit.get_checkpoint()))


@case("REPORT-007", "report", "A metrics-only report() does not change get_checkpoint().")
def test_metrics_only_report_keeps_the_checkpoint(tk):
    tk.fit(_metrics_only_keeps_checkpoint, config={"dir": tk.dir})
    assert tk.read("seen.json") == {"step": 1}


# -- metrics and Result --------------------------------------------------------------------------
def _three_checkpoints(config):
    for step in (1, 2, 3):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}))


@case("RESULT-001", "result", "When the last report has a checkpoint, Result.metrics are its metrics and "
      "Result.checkpoint holds its files.")
def test_result_metrics_and_checkpoint_are_the_last_report(tk):
    result = tk.fit(_three_checkpoints)
    assert result.metrics == {"step": 3}
    assert checkpoint_files(result.checkpoint) == {"step": 3}


def _metrics_only(config):
    trainkit.report({"step": 1}, checkpoint=checkpoint_with({"step": 1}))
    trainkit.report({"step": 2, "loss": 0.5})


@case("RESULT-002", "result", "Result.metrics are the last reported metrics, also when the last report has no "
      "checkpoint.", extension=True, ray_train=_RT_METRICS, ray_train_match=r"Result.metrics is \{'step': 1\}")
def test_result_metrics_are_the_last_report_even_without_checkpoint(tk):
    metrics = tk.fit(_metrics_only).metrics
    assert metrics == {"step": 2, "loss": 0.5}, f"Result.metrics is {metrics}, not the last report's"


def _no_checkpoint(config):
    trainkit.report({"step": 1})


@case("RESULT-003", "result", "A run that reports no checkpoint has Result.checkpoint None and "
      "best_checkpoints empty.")
def test_result_without_checkpoints(tk):
    result = tk.fit(_no_checkpoint)
    assert result.checkpoint is None
    assert list(result.best_checkpoints or []) == []


@case("RESULT-004", "result", "Result.path is <storage_path>/<name>, and the checkpoint lies under it.")
def test_result_path_is_the_run_folder(tk):
    result = tk.fit(_three_checkpoints, name="pathrun")
    assert os.path.normpath(str(result.path)) == os.path.normpath(tk.run_path("pathrun"))
    assert os.path.normpath(result.checkpoint.path).startswith(os.path.normpath(tk.run_path("pathrun")) + os.sep)


@case("RESULT-005", "result", "Result.metrics_dataframe has one row per report of the run, in order.",
      extension=True,
      ray_train="Ray Train 2.60's metrics_dataframe has one row per retained checkpoint, not per report "
      "(reference §10.4).", ray_train_match=r"metrics_dataframe steps: \[2\]")
def test_metrics_dataframe_is_the_report_history(tk):
    def fn(config):
        for step in (1, 2, 3):
            trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}) if step == 2 else None)

    df = tk.fit(fn).metrics_dataframe
    steps = None if df is None else list(df["step"])
    assert steps == [1, 2, 3], f"metrics_dataframe steps: {steps}, not one row per report"


def _returns_per_rank(config):
    return {"from": trainkit.get_context().get_world_rank()}


@case("RESULT-006", "result", "Result.return_value is rank 0's return value; other ranks' values are dropped.",
      requires=[MULTI_WORKER])
def test_return_value_is_rank_zeros(tk):
    assert tk.fit(_returns_per_rank, workers=2).return_value == {"from": 0}


@case("RESULT-007", "result", "Result.get_best_checkpoint(metric, mode) picks the retained checkpoint with the "
      "best value of metric.")
def test_get_best_checkpoint(tk):
    def fn(config):
        for step, loss in ((1, 0.9), (2, 0.1), (3, 0.5)):
            trainkit.report({"step": step, "loss": loss}, checkpoint=checkpoint_with({"step": step}))

    result = tk.fit(fn)
    assert checkpoint_files(result.get_best_checkpoint("loss", "min")) == {"step": 2}
    assert checkpoint_files(result.get_best_checkpoint("loss", "max")) == {"step": 1}
    with pytest.raises(ValueError):
        result.get_best_checkpoint("loss", "avg")
