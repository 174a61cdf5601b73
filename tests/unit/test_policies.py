"""Pure policies: retention (which checkpoints to keep, best order), the failure decision and scaling."""

from __future__ import annotations

import math

import pytest

from trainkit.policies import (CheckpointEntry, FailureDecision, count_fitting_workers, decide_failure,
                               decide_group_size, decide_resize, decide_retention, rank_checkpoints, score_of)


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


# -- scaling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("free_by_node, per_worker, fitting", [
    ({}, {"CPU": 1}, 0),                                                      # no node
    ({"a": {"CPU": 3}, "b": {"CPU": 1}}, {"CPU": 1}, 4),                      # summed over nodes
    ({"a": {"CPU": 1.5}, "b": {"CPU": 1.5}}, {"CPU": 1}, 2),                  # no bundle spans two nodes
    ({"a": {"CPU": 0.3 + 0.6}}, {"CPU": 0.3}, 3),                             # float noise does not lose one
    ({"a": {"CPU": 4, "GPU": 1}}, {"CPU": 1, "GPU": 1}, 1),                   # the scarcest resource decides
    ({"a": {"CPU": 4}}, {"CPU": 1, "GPU": 1}, 0),                             # a node without the resource
    ({"a": {"CPU": 4}}, {"CPU": 1, "GPU": 0}, 4),                             # a zero request is no constraint
    ({"a": {"CPU": 4, "tk_node_0": 1}}, {"CPU": 1, "tk_node_0": 0.001}, 4),  # custom resources count too
])
def test_count_fitting_workers_fits_whole_bundles_node_by_node(free_by_node, per_worker, fitting):
    assert count_fitting_workers(free_by_node, per_worker) == fitting


@pytest.mark.parametrize("fitting, min_workers, max_workers, world_size", [
    (0, 1, 3, 0),   # nothing fits: wait
    (1, 2, 3, 0),   # below min: wait
    (2, 2, 3, 2),   # exactly min
    (3, 2, 3, 3),   # exactly max
    (9, 2, 3, 3),   # capped at max
    (4, 4, 4, 4),   # fixed size
])
def test_decide_group_size_takes_the_largest_that_fits_up_to_max_and_waits_below_min(fitting, min_workers,
                                                                                     max_workers, world_size):
    decision = decide_group_size(fitting, min_workers, max_workers)
    assert decision.world_size == world_size
    assert str(fitting) in decision.reason
    if world_size == 0:
        assert f"min_workers={min_workers}" in decision.reason


@pytest.mark.parametrize("current, fitting_extra, min_workers, max_workers, grow_to", [
    (2, 0, 1, 3, 0),   # nothing free: keep
    (2, 1, 1, 3, 3),   # grow by one
    (2, 5, 1, 3, 3),   # grow, capped at max
    (3, 2, 1, 3, 0),   # already at max: keep
    (1, 1, 3, 4, 0),   # still below min after growing: keep (the controller restarts at min instead)
    (1, 2, 3, 4, 3),   # reaching min is growing
])
def test_decide_resize_grows_only_to_a_larger_size_within_min_and_max(current, fitting_extra, min_workers,
                                                                     max_workers, grow_to):
    assert decide_resize(current, fitting_extra, min_workers, max_workers) == grow_to
