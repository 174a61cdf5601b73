"""Pure policies: retention (which checkpoints to keep, best order) and the failure decision."""

from __future__ import annotations

import math

import pytest

from trainkit.policies import (CheckpointEntry, FailureDecision, decide_failure, decide_retention,
                               rank_checkpoints, score_of)


def _entries(*scores, attr="acc"):
    """Entries checkpoint_1.. in commit order; a score of None leaves the metric out."""
    out = []
    for i, s in enumerate(scores, start=1):
        metrics = {"step": i} if s is None else {"step": i, attr: s}
        out.append(CheckpointEntry(i, f"checkpoint_{i}", metrics))
    return out


def _dirs(entries):
    return [e.dir for e in entries]


def test_without_score_attribute_the_last_k_are_kept_and_the_rest_deleted():
    entries = _entries(1, 2, 3, 4, 5)
    r = decide_retention(entries, 2, None, "max")
    assert _dirs(r.keep) == ["checkpoint_4", "checkpoint_5"]
    assert _dirs(r.delete) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    assert _dirs(r.best) == ["checkpoint_4", "checkpoint_5"]  # oldest -> newest


def test_without_num_to_keep_everything_is_kept():
    entries = _entries(3, 1, 2)
    r = decide_retention(entries, None, "acc", "max")
    assert _dirs(r.keep) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    assert r.delete == ()
    assert _dirs(r.best) == ["checkpoint_2", "checkpoint_3", "checkpoint_1"]  # worst -> best


def test_score_order_max_keeps_the_highest_plus_the_latest():
    entries = _entries(5, 1, 4, 3, 2)
    r = decide_retention(entries, 2, "acc", "max")
    assert _dirs(r.best) == ["checkpoint_3", "checkpoint_1"]  # 4.0 then 5.0: worst -> best
    assert _dirs(r.keep) == ["checkpoint_1", "checkpoint_3", "checkpoint_5"]  # latest kept too
    assert _dirs(r.delete) == ["checkpoint_2", "checkpoint_4"]


def test_score_order_min_keeps_the_lowest_plus_the_latest():
    entries = _entries(5, 1, 4, 3, 2)
    r = decide_retention(entries, 2, "acc", "min")
    assert _dirs(r.best) == ["checkpoint_5", "checkpoint_2"]  # 2.0 then 1.0: worst -> best
    assert _dirs(r.keep) == ["checkpoint_2", "checkpoint_5"]
    assert _dirs(r.delete) == ["checkpoint_1", "checkpoint_3", "checkpoint_4"]


@pytest.mark.parametrize("order", ["max", "min"])
def test_missing_score_ranks_worst_in_both_orders(order):
    entries = _entries(2, None, 1, 3)  # checkpoint_2 has no "acc"
    ranked = rank_checkpoints(entries, "acc", order)
    assert ranked[0].dir == "checkpoint_2"
    r = decide_retention(entries, 2, "acc", order)
    assert "checkpoint_2" in _dirs(r.delete)
    assert "checkpoint_2" not in _dirs(r.best)


@pytest.mark.parametrize("order", ["max", "min"])
def test_nan_score_ranks_worst_in_both_orders(order):
    entries = _entries(2, float("nan"), 1, 3)
    ranked = rank_checkpoints(entries, "acc", order)
    assert ranked[0].dir == "checkpoint_2"
    assert score_of({"acc": float("nan")}, "acc", order) == -math.inf
    r = decide_retention(entries, 3, "acc", order)
    assert _dirs(r.delete) == ["checkpoint_2"]


@pytest.mark.parametrize("value", ["high", True, None, [1]])
def test_non_numeric_scores_rank_worst(value):
    assert score_of({"acc": value}, "acc", "max") == -math.inf
    assert score_of({"acc": value}, "acc", "min") == -math.inf


def test_nested_score_attribute_is_looked_up_with_a_slash():
    assert score_of({"val": {"acc": 0.75}}, "val/acc", "max") == 0.75
    assert score_of({"val": {"acc": 0.75}}, "val/acc", "min") == -0.75
    assert score_of({"val/acc": 0.5}, "val/acc", "max") == 0.5


def test_best_checkpoints_are_ordered_worst_to_best_with_ties_by_commit_order():
    entries = _entries(2, 7, 2, 5)
    assert _dirs(decide_retention(entries, None, "acc", "max").best) == [
        "checkpoint_1", "checkpoint_3", "checkpoint_4", "checkpoint_2"]
    assert _dirs(decide_retention(entries, None, "acc", "min").best) == [
        "checkpoint_2", "checkpoint_4", "checkpoint_1", "checkpoint_3"]


def test_latest_checkpoint_is_kept_even_when_it_scores_worst():
    entries = _entries(9, 8, 1)
    r = decide_retention(entries, 1, "acc", "max")
    assert _dirs(r.keep) == ["checkpoint_1", "checkpoint_3"]
    assert _dirs(r.best) == ["checkpoint_1"]
    assert _dirs(r.delete) == ["checkpoint_2"]


def test_retention_of_no_entries_is_empty():
    r = decide_retention([], 2, "acc", "max")
    assert (r.keep, r.delete, r.best) == ((), (), ())


def test_a_directory_shared_by_a_kept_entry_is_never_deleted():
    entries = [CheckpointEntry(1, "shared", {"acc": 1}), CheckpointEntry(2, "shared", {"acc": 2})]
    r = decide_retention(entries, 1, "acc", "max")
    assert r.delete == ()


@pytest.mark.parametrize("failures_so_far, max_failures, expected", [
    (1, 0, FailureDecision.RAISE),
    (1, 1, FailureDecision.RETRY),
    (2, 1, FailureDecision.RAISE),
    (2, 2, FailureDecision.RETRY),
    (3, 2, FailureDecision.RAISE),
    (1, -1, FailureDecision.RETRY),
    (10_000, -1, FailureDecision.RETRY),
])
def test_decide_failure_retries_the_nth_failure_iff_n_is_within_max_failures(failures_so_far, max_failures,
                                                                              expected):
    assert decide_failure(failures_so_far, max_failures) is expected


def test_decide_failure_counts_preemptions_against_their_own_limit():
    assert decide_failure(5, 0, preemption=True, preemptions_so_far=5, max_preemptions=-1) is FailureDecision.RETRY
    assert decide_failure(0, -1, preemption=True, preemptions_so_far=2, max_preemptions=1) is FailureDecision.RAISE


def test_decide_failure_never_retries_a_non_retryable_failure():
    assert decide_failure(1, -1, retryable=False) is FailureDecision.RAISE
