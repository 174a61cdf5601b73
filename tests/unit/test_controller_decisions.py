"""The controller's pure parts, without Ray: decide (every transition), decide_at_commit, the barrier's
rules and messages, the rank layout and the capacity views."""

from __future__ import annotations

import asyncio

import pytest

from trainkit.backends import barrier as br
from trainkit.backends.decide import (Abort, Budget, Fail, Finish, Outcome, Probe, RepairPlan, Resize, Restart,
                                      StopAfterCommit, decide, decide_at_commit, plan_repair, root_cause_first)
from trainkit.backends.ray.capacity import SUSPECT_S, add_resources, held_by_node, released, trusted
from trainkit.backends.ray.worker_group import rank_layout
from trainkit.config import FailureConfig
from trainkit.errors import CheckpointError, HangDetectedError, ReportError, WorkerFailure, WorkerGroupError


def _f(rank=0, kind="exception", message="boom"):
    return WorkerFailure(world_rank=rank, kind=kind, exc_type="ValueError", message=message)


# -- decide: one row per transition ---------------------------------------------------------------
HANG_ERR = HangDetectedError("hang at report 3", [_f(1, "hang")])

ROWS = [
    # (name, outcome, budget before, failure config, action type, budget after, action checks)
    ("every rank finished", Outcome(value=7), Budget(), FailureConfig(), Finish, Budget(),
     {"value": 7}),
    ("an abort is not retried", Outcome(failures=(_f(-1, "aborted"),), aborted=True), Budget(),
     FailureConfig(max_failures=-1), Abort, Budget(), {}),
    ("a resize is uncounted", Outcome(failures=(_f(-1, "resize"),)), Budget(1, 2), FailureConfig(), Resize,
     Budget(1, 2), {}),
    ("a failure within the budget restarts, keeping the returned ranks",
     Outcome(failures=(_f(1, "died"),), returned=frozenset({0, 2})), Budget(), FailureConfig(max_failures=1),
     Restart, Budget(1, 0), {"kind": "failure", "keep": frozenset({0, 2}), "wait_for_preempted": False}),
    ("the failure past max_failures fails the run", Outcome(failures=(_f(),)), Budget(1, 0),
     FailureConfig(max_failures=1), Fail, Budget(2, 0), {"kind": "failure"}),
    ("max_failures=-1 retries for ever", Outcome(failures=(_f(),)), Budget(99, 0),
     FailureConfig(max_failures=-1), Restart, Budget(100, 0), {}),
    ("a UserCallback's error is never retried (a controller failure)",
     Outcome(failures=(_f(-1, "callback"), _f(0, "callback"), _f(1, "collective"))), Budget(),
     FailureConfig(max_failures=5), Fail, Budget(1, 0), {"kind": "failure"}),
    ("a mismatch is never retried", Outcome(failures=(_f(1, "mismatch"),)), Budget(),
     FailureConfig(max_failures=5), Fail, Budget(1, 0), {"kind": "failure"}),
    ("a preemption is counted apart and waits for the noticed nodes",
     Outcome(failures=(_f(1, "preempted"),), returned=frozenset({0}), preempted=frozenset({1})), Budget(),
     FailureConfig(max_failures=0), Restart, Budget(0, 1),
     {"kind": "preemption", "keep": frozenset(), "wait_for_preempted": True, "regrow_after_preempted": False}),
    ("preemptions past max_preemptions fail", Outcome(failures=(_f(0, "preempted"),)), Budget(0, 1),
     FailureConfig(max_preemptions=1), Fail, Budget(0, 2), {"kind": "preemption"}),
    ("a hang restart counts as a failure", Outcome(failures=(_f(1, "hang"),), returned=frozenset({0})),
     Budget(), FailureConfig(max_failures=1), Restart, Budget(1, 0), {"kind": "hang", "keep": frozenset({0})}),
    ("a hang with action=fail fails with its error", Outcome(failures=(_f(1, "hang"),), hang_error=HANG_ERR),
     Budget(), FailureConfig(max_failures=3), Fail, Budget(1, 0), {"kind": "hang", "error": HANG_ERR}),
    ("an elastic group keeps its survivors too (it re-forms smaller)",
     Outcome(failures=(_f(1, "died"),), returned=frozenset({0}), elastic=True), Budget(),
     FailureConfig(max_failures=1), Restart, Budget(1, 0), {"keep": frozenset({0})}),
    ("an elastic group keeps the ranks without a notice through a preemption, at once",
     Outcome(failures=(_f(1, "preempted"),), returned=frozenset({0, 1, 2}), preempted=frozenset({1}), elastic=True),
     Budget(), FailureConfig(max_failures=0), Restart, Budget(0, 1),
     {"kind": "preemption", "keep": frozenset({0, 2}), "wait_for_preempted": False,
      "regrow_after_preempted": True}),
    ("an elastic group that would fall below min_workers waits for the noticed nodes first",
     Outcome(failures=(_f(1, "preempted"),), returned=frozenset({0, 1, 2}), preempted=frozenset({1, 2}),
             elastic=True, min_workers=2),
     Budget(), FailureConfig(max_failures=0), Restart, Budget(0, 1),
     {"kind": "preemption", "keep": frozenset({0}), "wait_for_preempted": True, "regrow_after_preempted": False}),
    ("a noticed rank is not kept", Outcome(failures=(_f(1, "died"),), returned=frozenset({0, 2}),
                                           preempted=frozenset({2})), Budget(), FailureConfig(max_failures=1),
     Restart, Budget(1, 0), {"keep": frozenset({0})}),
]


@pytest.mark.parametrize("name,outcome,before,fc,kind,after,checks", ROWS, ids=[r[0] for r in ROWS])
def test_decide_maps_each_way_an_attempt_ends_to_one_action(name, outcome, before, fc, kind, after, checks):
    action, budget = decide(outcome, before, fc)
    assert type(action) is kind
    assert budget == after
    for attr, want in checks.items():
        assert getattr(action, attr) == want, attr


def test_a_failed_run_names_the_budget_and_the_root_cause():
    action, _ = decide(Outcome(failures=(_f(1, "died", "the worker process died"), _f(0))), Budget(2, 0),
                       FailureConfig(max_failures=2))
    assert isinstance(action.error, WorkerGroupError) and not isinstance(action.error, HangDetectedError)
    assert "3 failure(s), max_failures=2; root cause: rank 1:" in str(action.error)
    assert [f.world_rank for f in action.error.failures] == [1, 0]
    action, _ = decide(Outcome(failures=(_f(1, "mismatch", "report 2"),)), Budget(), FailureConfig(max_failures=9))
    assert "ranks disagree about report()" in str(action.error)
    action, _ = decide(Outcome(failures=(_f(0, "hang"),)), Budget(), FailureConfig())
    assert isinstance(action.error, HangDetectedError)
    action, _ = decide(Outcome(failures=(_f(0, "preempted"),)), Budget(0, 1), FailureConfig(max_preemptions=1))
    assert "2 preemption(s), max_preemptions=1" in str(action.error)


def test_root_cause_first_puts_a_peers_broken_collective_last():
    collateral = _f(0, message="Connection closed by peer [1.2.3.4]:5")
    cause = _f(1, message="ZeroDivisionError")
    assert root_cause_first([collateral, cause]) == [cause, collateral]


# -- plan_repair: how lost ranks are replaced ------------------------------------------------------
@pytest.mark.parametrize("kw,want", [
    (dict(kept=1, lost=1, spares_ready=1, elastic=False, min_workers=2), RepairPlan(spares=1)),
    (dict(kept=1, lost=1, spares_ready=0, elastic=False, min_workers=2), RepairPlan(start=1)),
    (dict(kept=0, lost=3, spares_ready=1, elastic=False, min_workers=3), RepairPlan(spares=1, start=2)),
    (dict(kept=2, lost=1, spares_ready=0, elastic=True, min_workers=1), RepairPlan(regrow=1)),
    (dict(kept=2, lost=1, spares_ready=1, elastic=True, min_workers=1), RepairPlan(spares=1)),
    (dict(kept=1, lost=2, spares_ready=0, elastic=True, min_workers=2), RepairPlan(start=1, regrow=1)),
    (dict(kept=0, lost=2, spares_ready=0, elastic=True, min_workers=1), RepairPlan(start=1, regrow=1)),
], ids=["fixed-spare", "fixed-start", "fixed-some-spares", "elastic-shrinks", "elastic-spare",
        "elastic-not-below-min", "elastic-nothing-kept"])
def test_plan_repair_uses_spares_first_and_an_elastic_group_shrinks_instead_of_waiting(kw, want):
    assert plan_repair(**kw) == want


# -- decide_at_commit ------------------------------------------------------------------------------
def _commit(**kw):
    args = dict(index=3, checkpointed=True, world_size=2, preempted={}, grow_ready=0, elastic=True,
                min_workers=1, max_workers=3)
    args.update(kw)
    return decide_at_commit(**args)


def test_a_preemption_notice_stops_the_attempt_after_the_commit():
    step = _commit(preempted={1: "node-b"}, grow_ready=1)
    assert isinstance(step, StopAfterCommit)
    assert (step.failure.kind, step.failure.world_rank, step.failure.node_id) == ("preempted", 1, "node-b")
    assert step.failure.message == "rank 1 preempted; stopped after report 3"


def test_an_elastic_group_grows_only_at_a_checkpointed_report():
    step = _commit(grow_ready=1)
    assert isinstance(step, StopAfterCommit) and step.failure.kind == "resize"
    assert "growing from 2" in step.failure.message and "capacity for 3 workers" in step.failure.message
    assert _commit(grow_ready=1, checkpointed=False) is None


def test_a_group_below_max_probes_and_a_full_or_fixed_group_does_not():
    assert isinstance(_commit(), Probe)
    assert _commit(world_size=3) is None
    assert _commit(elastic=False) is None
    assert _commit(elastic=False, preempted={0: "n"}) is not None  # a notice stops any group


# -- the barrier ------------------------------------------------------------------------------------
def test_the_last_arrival_completes_a_round_and_a_different_key_is_a_mismatch():
    async def go():
        b = br.Barrier(2)
        rnd, done = b.arrive(0, ("report", 1), "p0", now=1.0)
        assert not done and b.round is rnd and b.rounds == 0
        with pytest.raises(ReportError, match=r"rank 0 in report 1, rank 1 in barrier 1"):
            b.arrive(1, ("barrier", 1), None, now=1.1)
        rnd2, done = b.arrive(1, ("report", 1), "p1", now=1.2)
        assert done and rnd2 is rnd and rnd.arrivals == {0: "p0", 1: "p1"}
        assert b.round is None and b.rounds == 1 and b.changed.is_set()
        b.changed.clear()
        rnd, _ = b.arrive(1, ("report", 2), None, now=2.0)
        assert b.close(("stop", "over")) is rnd and rnd.fut.result() == ("stop", "over")
        assert b.close(("stop", "again")) is None and b.rounds == 2

    asyncio.run(go())


def test_the_mismatch_messages_name_the_ranks_and_their_counts():
    e = br.returned_while_waiting(1, 2, [0], ("report", 3))
    assert str(e).startswith("rank 1 returned from the training function after 2 report(s) while rank 0 wait in "
                             "report 3")
    e = br.arrived_after_return(0, ("report", 4), {1: 3, 2: 3})
    assert "ranks [1, 2] already returned from the training function after 3 report(s)" in str(e)
    assert br.gathered_mismatch([("report", 1), ("report", 1)], [None, None]) is None
    e = br.gathered_mismatch([("report", 2), ("finish", 1)], [None, 1])
    assert "rank 0 is waiting at report 2, rank 1 returned after 1 report(s)" in str(e)
    e = br.gathered_mismatch([("barrier", 1), ("broadcast", 1)], [None, None])
    assert "ranks called different collectives: barrier #1 vs broadcast #1" in str(e)


def test_a_report_payload_is_rank_zeros_metrics_and_one_checkpoint_folder():
    metrics, d, files = br.report_payload(2, {0: ({"loss": 1}, "ck", ["a"]), 1: (None, "ck", ["b"])})
    assert (metrics, d, files) == ({"loss": 1}, "ck", {0: ["a"], 1: ["b"]})
    assert br.report_payload(1, {0: (None, None, None)}) == ({}, None, {})
    with pytest.raises(CheckpointError, match="different checkpoint_dir_name"):
        br.report_payload(3, {0: ({}, "a", []), 1: (None, "b", [])})


# -- the rank layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes,ranks,local,node_rank", [
    (["a"], [0], [0], [0]),
    (["a", "a", "b", "b"], [0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 1, 1]),
    (["a", "b", "a", "b"], [0, 2, 1, 3], [0, 0, 1, 1], [0, 1, 0, 1]),
    (["b", "a", "a"], [0, 1, 2], [0, 0, 1], [0, 1, 1]),
])
def test_ranks_are_consecutive_within_a_node_in_order_of_first_appearance(nodes, ranks, local, node_rank):
    got_ranks, layout = rank_layout(nodes)
    assert got_ranks == ranks
    assert [x["local_rank"] for x in layout] == local
    assert [x["node_rank"] for x in layout] == node_rank
    assert [x["local_world_size"] for x in layout] == [nodes.count(n) for n in nodes]
    by_world = [nodes[b] for b in got_ranks]
    assert by_world == sorted(by_world, key=lambda n: nodes.index(n))  # consecutive per node


# -- capacity -------------------------------------------------------------------------------------------
def test_nodes_with_a_recent_death_or_a_live_notice_are_not_trusted():
    free = {"a": {"CPU": 2}, "b": {"CPU": 2}, "c": {"CPU": 2}}
    now = 100.0
    assert set(trusted(free, {"a": now - 1}, {"b": now + 5}, now)) == {"c"}
    assert set(trusted(free, {"a": now - SUSPECT_S - 1}, {"b": now - 1}, now)) == {"a", "b", "c"}


def test_held_resources_and_their_release_are_seen_per_node():
    held = held_by_node([{"node_id": "a"}, {"node_id": "a"}, {"node_id": "b"}], {"CPU": 1})
    assert held == {"a": {"CPU": 2}, "b": {"CPU": 1}}
    before = {"a": {"CPU": 0}, "b": {"CPU": 1}}
    back, dead = released({"a": {"CPU": 2}, "b": {"CPU": 1}}, before, held)
    assert (back, dead) == ({"a"}, set())  # b still shows its CPU taken
    back, dead = released({"a": {"CPU": 1}}, before, held)
    assert (back, dead) == (set(), {"b"})
    assert add_resources({"a": {"CPU": 1}}, held) == {"a": {"CPU": 3}, "b": {"CPU": 1}}


@pytest.mark.parametrize("message,collective,peer", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:13220",
     True, None),
    ("NCCL communicator was aborted on rank 1. Original reason: Watchdog caught collective operation timeout",
     True, 1),
    ("Timed out waiting 1800000ms for recv operation to complete", True, None),
    ("ZeroDivisionError: division by zero", False, None),
])
def test_a_collectives_error_is_told_apart_with_the_peer_it_names(message, collective, peer):
    from trainkit.backends.api import failure_from
    from trainkit.backends.decide import is_collective_error, peer_rank

    assert is_collective_error(message) is collective
    f = failure_from(RuntimeError(message), 0)
    assert f.kind == ("collective" if collective else "exception")
    assert (f.peer_rank if collective else peer_rank(message)) == peer


def test_the_rank_that_raised_comes_before_the_peers_broken_collectives():
    broken = WorkerFailure(world_rank=0, kind="collective", message="gloo: Connection reset by peer")
    cause = _f(1, "exception", "ValueError: bad batch")
    assert root_cause_first([broken, cause]) == [cause, broken]


def test_a_callback_failure_fails_with_a_controller_error_that_leads_with_it():
    from trainkit.errors import ControllerError

    action, _ = decide(Outcome(failures=(_f(1, "collective"), _f(-1, "callback"), _f(0, "callback"))), Budget(),
                       FailureConfig(max_failures=-1))
    assert isinstance(action, Fail) and type(action.error) is ControllerError
    assert [f.world_rank for f in action.error.failures] == [-1, 1]  # the callback first; the ranks' copies dropped

