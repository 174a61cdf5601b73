"""Cases for rules that the mutation check (conformance/mutants) found no case could see.

Each case tests one rule as a user meets it: a report that returned is on storage, a
resumed run continues the report history, mismatched reports fail at once and are never
retried, max_preemptions bounds preemptions, ranks are laid out by node, an elastic group
grows back, a re-committed checkpoint holds only the new attempt's files, and a mid-epoch
data resume hands every row out exactly once. Ids are numbered from 101 in their categories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest

import trainkit
from conformance.case import case
from conformance.harness import checkpoint_files, checkpoint_with, count_attempt, put, resume_step, wait_for
from trainkit.backends.api import DURABLE_REPORT, ELASTIC, MULTI_WORKER, PREEMPTION, VIRTUAL_NODES

STORAGE = pytest.mark.parametrize("storage", ["local", "s3"])  # durability/persistence cases: local disk and moto S3

_RT_MISMATCH_HANG = ("Ray Train 2.60 hangs when ranks call report() a different number of times: the rank still "
                     "in report() waits forever (no default collective timeout; only RAY_TRAIN_COLLECTIVE_TIMEOUT_S "
                     "ends it), so the case's bound ends the run (reference §7.6, W4, E2 mismatch).")
_RT_CROSSTALK = ("Ray Train 2.60 pairs report() on one rank with a collective on another silently (one unsequenced "
                 "barrier): fit() returns, the collective returns the report's checkpoint dir name and the round "
                 "is dropped (reference §7.2.2, W5, E9).")


def _mismatch_failure(err) -> "trainkit.WorkerFailure":
    """The run's failure record of kind ``mismatch`` (asserted on its fields, never on traceback text)."""
    found = [f for f in err.failures if f.kind == "mismatch"]
    assert found, f"no failure of kind 'mismatch' among {[(f.world_rank, f.kind, f.message) for f in err.failures]}"
    return found[0]


# -- durability ------------------------------------------------------------------------------------
def _reads_own_run_folder(config):
    seen = []
    for step in (1, 2):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}))
        loaded = trainkit.Result.from_path(config["run"])  # the run folder as a new driver would read it
        seen.append(checkpoint_files(loaded.checkpoint))
    put(config["dir"], "seen.json", seen)


@case("DUR-101", "durability", "Once report(checkpoint) has returned, the run folder already records that "
      "checkpoint: Result.from_path(run folder), read during the run, gives its files.",
      requires=[DURABLE_REPORT], extension=True)
@STORAGE
def test_a_returned_report_is_recorded_in_the_run_folder(tk, storage):
    path = tk.storage_for(storage)
    tk.fit(_reads_own_run_folder, config={"dir": tk.dir, "run": tk.run_path("ondisk", path)}, name="ondisk",
           storage_path=path)
    assert tk.read("seen.json") == [{"step": 1}, {"step": 2}], \
        "after report() returned, the run folder did not name the checkpoint just reported"


def _attempt_files(config):
    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    start = resume_step()
    for step in range(start + 1, 4):
        if attempt == 1 and step == 2 and rank == 1:
            raise ValueError("rank 1 fails before report 2")  # rank 0 is in report 2, its files uploaded
        files = {"step": step, f"from-attempt-{attempt}": attempt}
        trainkit.report({"step": step}, checkpoint=checkpoint_with(files) if rank == 0 else None)


@case("DUR-102", "durability", "A checkpoint re-committed after a failed round holds only the files of the "
      "attempt that committed it, and no uncommitted checkpoint folder is left in the run folder.",
      requires=[MULTI_WORKER])
@STORAGE
def test_a_recommitted_checkpoint_holds_only_the_new_attempts_files(tk, storage):
    path = tk.storage_for(storage)
    result = tk.fit(_attempt_files, workers=2, config={"dir": tk.dir}, name="recommit", max_failures=1,
                    storage_path=path)
    by_step = {m["step"]: checkpoint_files(c) for c, m in result.best_checkpoints}
    assert by_step[2] == {"step": 2, "from-attempt-2": 2}, f"checkpoint of step 2 holds {sorted(by_step[2])}"
    fs, root = tk.fs_for(path)  # the run folder is listed through the storage's own filesystem
    run = f"{root}/recommit"
    committed = {os.path.basename(os.path.normpath(c.path)) for c, _ in result.best_checkpoints}
    left = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(run, detail=False)
            if fs.isfile(f"{p.rstrip('/')}/step")} - committed
    assert not left, f"uncommitted checkpoint folders left in the run folder: {sorted(left)}"


# -- persistence: the report history continues -----------------------------------------------------
def _history(config):
    ctx = trainkit.get_context()
    put(config["dir"], f"index-at-start-{config['run']}.json", ctx.get_report_index())
    start = resume_step()
    for step in range(start + 1, start + 3):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}))


@case("PERSIST-101", "persistence", "A run resumed from the checkpoint of report k continues the report history: "
      "get_report_index() is k at the start, and the next reports are k+1, k+2 (their default checkpoint folders "
      "checkpoint_<k+1>, checkpoint_<k+2>).", extension=True,
      ray_train="Ray Train 2.60 has no report index: a resumed run's forwarded context counts reports from 0 "
      "again, and its default checkpoint folders are named by time (checkpoint_<timestamp>), not by report.")
@STORAGE
def test_a_resumed_run_continues_the_report_index(tk, storage):
    path = tk.storage_for(storage)
    tk.fit(_history, config={"dir": tk.dir, "run": 1}, name="history", storage_path=path)
    result = tk.fit(_history, config={"dir": tk.dir, "run": 2}, name="history", storage_path=path)
    assert (tk.read("index-at-start-1.json"), tk.read("index-at-start-2.json")) == (0, 2)
    assert os.path.basename(os.path.normpath(result.checkpoint.path)) == "checkpoint_4"
    assert checkpoint_files(result.checkpoint) == {"step": 4}


# -- report barrier: mismatches ------------------------------------------------------------------------
def _returns_while_peer_waits(config):
    rank = trainkit.get_context().get_world_rank()
    for i in range(2 if rank == 0 else 3):
        trainkit.report({"i": i})
    if rank == 0:
        time.sleep(1.0)  # the stimulus: rank 1 is already waiting in report 3 when rank 0 returns


@case("REPORT-101", "report", "A rank whose training function returns while another rank waits in report() ends "
      "the run at once with a failure of kind 'mismatch' whose message says 'report' and names the ranks.",
      requires=[MULTI_WORKER], extension=True, bound_s=90, ray_train=_RT_MISMATCH_HANG,
      ray_train_raises="CaseTimeout")
def test_returning_while_a_peer_waits_in_report_fails_fast(tk):
    _fails_fast_naming_both_ranks(tk, _returns_while_peer_waits)


def _fails_fast_naming_both_ranks(tk, fn) -> None:
    """The run of ``fn`` on 2 workers fails with a mismatch failure naming report and both ranks,
    well before any timeout."""
    t0 = time.monotonic()
    f = _mismatch_failure(tk.fails(fn, workers=2))
    assert "report" in f.message and "rank 0" in f.message and "rank 1" in f.message, f.message
    assert time.monotonic() - t0 < 60, "a report mismatch must not wait for a timeout"


def _reports_after_peer_returned(config):
    rank = trainkit.get_context().get_world_rank()
    for i in range(2):
        trainkit.report({"i": i})
    if rank == 1:
        time.sleep(1.0)  # the stimulus: rank 0 has returned when rank 1 makes its third report
        trainkit.report({"i": 2})


@case("REPORT-102", "report", "A rank that calls report() after another rank's training function returned ends "
      "the run at once with a failure of kind 'mismatch' whose message says 'report' and names both ranks.",
      requires=[MULTI_WORKER], extension=True, bound_s=90, ray_train=_RT_MISMATCH_HANG,
      ray_train_raises="CaseTimeout")
def test_reporting_after_a_peer_returned_fails_fast(tk):
    _fails_fast_naming_both_ranks(tk, _reports_after_peer_returned)


def _uneven_counted(config):
    rank = trainkit.get_context().get_world_rank()
    count_attempt(config["dir"], rank)
    for i in range(2 if rank == 0 else 3):
        trainkit.report({"i": i})


@case("REPORT-103", "report", "A report mismatch is never retried: with max_failures=2, ranks that call report() "
      "a different number of times run once and the run fails.", requires=[MULTI_WORKER], extension=True,
      bound_s=90, ray_train=_RT_MISMATCH_HANG, ray_train_raises="CaseTimeout")
def test_a_mismatch_is_not_retried(tk):
    err = tk.fails(_uneven_counted, workers=2, config={"dir": tk.dir}, max_failures=2)
    _mismatch_failure(err)
    assert (len(tk.lines("starts-rank0")), len(tk.lines("starts-rank1"))) == (1, 1), "the mismatch was retried"


def _report_against_barrier(config):
    if trainkit.get_context().get_world_rank() == 0:
        trainkit.report({"i": 1})
    else:
        trainkit.collective.barrier()


@case("REPORT-104", "report", "A report() on one rank against a barrier() on another fails the run with a failure "
      "of kind 'mismatch' whose message names both operations.", requires=[MULTI_WORKER], extension=True,
      bound_s=90, ray_train=_RT_CROSSTALK, ray_train_match=r"fit\(\) returned")
def test_report_against_barrier_names_both_operations(tk):
    f = _mismatch_failure(tk.fails(_report_against_barrier, workers=2))
    assert "report" in f.message and "barrier" in f.message, f.message


# -- preemption --------------------------------------------------------------------------------------
def _preempted_once(config):
    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    step = resume_step()
    while step < 40:
        step += 1
        if attempt == 1 and rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice
            wait_for(ctx.is_preempted, 20, "is_preempted() after SIGTERM")
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}) if rank == 0 else None)
        if attempt > 1 and step >= 4:
            return step


@case("PREEMPT-101", "preemption", "Preemptions are bounded by FailureConfig.max_preemptions: with "
      "max_preemptions=0 a preemption notice ends the run with TrainingFailedError instead of a restart.",
      requires=[MULTI_WORKER, PREEMPTION], extension=True)
def test_max_preemptions_bounds_preemptions(tk):
    from trainkit.torch import TorchTrainer

    rc = trainkit.RunConfig(name=tk.new_name(), storage_path=tk.storage,
                            failure_config=trainkit.FailureConfig(max_failures=2, max_preemptions=0))
    trainer = TorchTrainer(_preempted_once, train_loop_config={"dir": tk.dir}, run_config=rc,
                           scaling_config=trainkit.ScalingConfig(num_workers=2), backend=tk.backend_name)
    with pytest.raises(trainkit.TrainingFailedError) as info:
        trainer.fit()
    assert any(f.kind == "preempted" for f in info.value.failures), info.value.failures
    assert len(tk.lines("starts-rank0")) == 1, "the run restarted past max_preemptions=0"


# -- context: ranks on several nodes -----------------------------------------------------------------
@contextlib.contextmanager
def _two_nodes():
    """The suite's Ray when it has two nodes of 2 CPUs or more; else a private 2-node cluster for the
    block (the suite's Ray is rejoined afterwards)."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 2]
    if len(nodes) >= 2:
        yield
        return
    from trainkit_testing.cluster import Cluster

    address = ray.get_runtime_context().gcs_address
    with Cluster(nodes=2, cpus_per_node=2, env={"TRAINKIT_PROGRESS": "0"}, fast_failure=False, log_to_driver=False,
                 tmp_prefix="tkconf-"):
        yield
    ray.init(address=address, log_to_driver=False)


def _layout(config):
    ctx = trainkit.get_context()
    put(config["dir"], f"layout-{ctx.get_world_rank()}.json", {
        "world_rank": ctx.get_world_rank(), "local_rank": ctx.get_local_rank(),
        "local_world_size": ctx.get_local_world_size(), "node_rank": ctx.get_node_rank(),
        "node": ctx.get_node_id(), "env_local_rank": os.environ.get("LOCAL_RANK")})


@case("CTX-101", "context", "With 4 workers spread over 2 nodes, each node's ranks are consecutive, local ranks "
      "count from 0 on each node (LOCAL_RANK matches), local world size is 2, and node ranks number the nodes "
      "in rank order.", requires=[MULTI_WORKER, VIRTUAL_NODES], extension=True)
def test_rank_layout_over_two_nodes(tk):
    from trainkit.torch import TorchTrainer

    with _two_nodes():
        rc = trainkit.RunConfig(name=tk.new_name(), storage_path=tk.storage)
        TorchTrainer(_layout, train_loop_config={"dir": tk.dir}, run_config=rc, backend=tk.backend_name,
                     scaling_config=trainkit.ScalingConfig(num_workers=4, placement_strategy="SPREAD")).fit()
    seen = sorted(tk.read_all("layout-").values(), key=lambda c: c["world_rank"])
    nodes = [c["node"] for c in seen]
    assert len(set(nodes)) == 2, f"4 SPREAD workers ran on {len(set(nodes))} node(s)"
    assert nodes == sorted(nodes, key=nodes.index), f"ranks by node {nodes}: a node's ranks are not consecutive"
    assert [c["local_rank"] for c in seen] == [0, 1, 0, 1], seen
    assert [c["env_local_rank"] for c in seen] == ["0", "1", "0", "1"], seen
    assert [c["local_world_size"] for c in seen] == [2, 2, 2, 2], seen
    assert [c["node_rank"] for c in seen] == [0, 0, 1, 1], seen


# -- elastic: growing back ----------------------------------------------------------------------------
def _grows(config):
    ctx = trainkit.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    start = resume_step()
    put(config["dir"], f"start-ws{size}-rank{rank}.json", start)
    step = start
    while step < config["max_steps"]:
        step += 1
        if size == 1 and step == 2:
            put(config["dir"], "free-capacity.json", step)  # the test frees the rest of the cluster now
        trainkit.report({"step": step, "world_size": size}, checkpoint=checkpoint_with({"step": step})
                        if rank == 0 else None)
        if size == config["max"] and step >= start + 2:
            return step
        time.sleep(0.1)  # a step of work


@case("ELASTIC-101", "elastic", "An elastic group started smaller than max_workers for lack of capacity grows "
      "to max_workers at a checkpointed report once capacity returns, every rank resuming from that checkpoint.",
      requires=[MULTI_WORKER, ELASTIC], extension=True,
      ray_train="Ray Train 2.60 did not start the elastic group ScalingConfig(num_workers=(1, 4)) on the one CPU "
      "another job's placement group left free: it waited, and started with 4 workers once the case's 120 s wait "
      "for the group's first step had run out and that placement group was removed (whole-suite run of "
      "2026-12-02).", ray_train_match="did not start with 1 worker")
def test_an_elastic_group_grows_back(tk):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if tk.backend_name == "ray":  # warm idle groups of earlier cases hold CPUs the stand-in load needs
        from trainkit.backends.ray import release_warm_workers

        release_warm_workers()
    capacity = int(ray.cluster_resources().get("CPU", 0))
    hold = placement_group([{"CPU": 1}] * (capacity - 1))  # another job holds all but one CPU
    ray.get(hold.ready(), timeout=60)
    freed = threading.Event()

    def free_when_asked():
        try:
            wait_for(lambda: os.path.exists(os.path.join(tk.dir, "free-capacity.json")), 120, "the group's start")
        finally:
            remove_placement_group(hold)
            freed.set()

    t = threading.Thread(target=free_when_asked, daemon=True)
    t.start()
    try:
        result = tk.fit(_grows, workers=(1, capacity), config={"dir": tk.dir, "max": capacity, "max_steps": 150})
    finally:
        if not freed.is_set():
            remove_placement_group(hold)
        t.join(10)
    starts = tk.read_all("start-")
    assert "start-ws1-rank0.json" in starts, f"the group did not start with 1 worker: {sorted(starts)}"
    grown = {n: v for n, v in starts.items() if n.startswith(f"start-ws{capacity}-")}
    assert len(grown) == capacity, f"the group never grew to {capacity} workers: {sorted(starts)}"
    assert len(set(grown.values())) == 1 and min(grown.values()) >= 2, \
        f"the grown group's ranks resumed from {grown}, not one checkpoint after the growth"
    assert result.metrics["world_size"] == capacity


# -- data: a mid-epoch resume --------------------------------------------------------------------------
def _rows_once(config):
    from trainkit.data import load_shard_states, save_shard_state

    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    states, done = None, []
    ckpt = trainkit.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            states = load_shard_states(d, "train")
            done = checkpoint_files(ckpt).get(f"rows-rank{rank}.json") or []
    shard = trainkit.get_dataset_shard("train", state_dict=states)
    for n, row in enumerate(shard.iter_rows(), start=1):
        done = done + [int(row)]
        folder = checkpoint_with({f"rows-rank{rank}.json": done})
        save_shard_state(folder.path, shard.state_dict())
        trainkit.report({"rows": len(done)}, checkpoint=folder)
        if attempt == 1 and rank == 1 and n == 2:
            raise ValueError("rank 1 fails after its second row's report")


@case("DATA-101", "data", "A shard restored mid-epoch from every rank's state_dict() in the last checkpoint "
      "hands out exactly the rows not yet consumed: across a failure every row is processed once.",
      requires=[MULTI_WORKER], extension=True)
def test_mid_epoch_resume_hands_out_every_row_once(tk):
    result = tk.fit(_rows_once, workers=2, config={"dir": tk.dir}, datasets={"train": list(range(8))},
                    max_failures=1)
    files = checkpoint_files(result.checkpoint)
    rows = files.get("rows-rank0.json", []) + files.get("rows-rank1.json", [])
    assert sorted(rows) == list(range(8)), f"rows processed across the restart: {sorted(rows)}"
