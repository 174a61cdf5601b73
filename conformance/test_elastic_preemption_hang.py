"""Cases: elastic, preemption and hang diagnosis."""

from __future__ import annotations

import os
import signal
import time

import trainkit
from conformance.case import case
from conformance.harness import checkpoint_files, checkpoint_with, count_attempt, put, resume_step, wait_for
from trainkit.backends.api import ELASTIC, HANG_DIAGNOSTICS, MULTI_WORKER, PREEMPTION
from trainkit.events import read_run_dicts

_RT_HANG = ("Ray Train 2.60 has no hang detection at the report barrier (HangConfig has no Ray Train "
            "counterpart): the other ranks wait for the slow rank as long as it takes and the run then finishes, "
            "with no hang_detected record and no stacks (reference §16, W15, §7.6).")


# -- elastic --------------------------------------------------------------------------------------
def _world(config):
    ctx = trainkit.get_context()
    put(config["dir"], f"world-{ctx.get_world_rank()}.json", ctx.get_world_size())
    for step in (1, 2):
        trainkit.report({"step": step, "world_size": ctx.get_world_size()},
                        checkpoint=checkpoint_with({f"rank{ctx.get_world_rank()}": step}))


@case("ELASTIC-001", "elastic", "ScalingConfig(num_workers=(1, 6)) on a cluster with room for fewer than 6 "
      "workers starts with as many as fit, each rank seeing that world size, and its checkpointed reports commit "
      "every rank's files.",
      requires=[MULTI_WORKER, ELASTIC])
def test_elastic_starts_with_as_many_workers_as_fit(tk):
    import ray

    capacity = int(ray.cluster_resources().get("CPU", 0))
    if tk.backend_name == "ray":  # warm idle groups of earlier cases hold CPUs
        from trainkit.backends.ray import release_warm_workers

        release_warm_workers()
    wait_for(lambda: int(ray.available_resources().get("CPU", 0)) >= capacity, 60, f"{capacity} free CPUs")
    result = tk.fit(_world, workers=(1, 6), config={"dir": tk.dir})
    sizes = list(tk.read_all("world-").values())
    assert len(sizes) == min(6, capacity), f"{len(sizes)} ranks ran on a cluster with {capacity} CPUs"
    assert set(sizes) == {len(sizes)}
    assert result.metrics == {"step": 2, "world_size": len(sizes)}, result.metrics
    assert checkpoint_files(result.checkpoint) == {f"rank{r}": 2 for r in range(len(sizes))}, \
        "the last checkpoint does not hold every rank's files"


@case("ELASTIC-002", "elastic", "A minimum number of workers the cluster can never hold fails fit() before "
      "training starts, with an error that says how many workers it cannot hold.",
      requires=[MULTI_WORKER, ELASTIC], extension=True,
      ray_train="Ray Train 2.60 on a cluster without autoscaler config waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S "
      "(60 s) per attempt and retries forever (controller_failure_limit=-1), so the case's bound ends the run "
      "(reference §3.12, W10, E5 insufficient).", ray_train_raises="CaseTimeout", bound_s=100)
def test_impossible_minimum_fails_fast(tk):
    import ray

    capacity = int(ray.cluster_resources().get("CPU", 0))
    t0 = time.monotonic()
    err = tk.fails(_world, workers=(capacity + 4, capacity + 6), config={"dir": tk.dir})
    assert str(capacity + 4) in str(err), str(err)
    assert time.monotonic() - t0 < 60
    assert tk.read_all("world-") == {}, "training started although the minimum can never be met"


# -- preemption -------------------------------------------------------------------------------------
def _preempted_loop(config):
    ctx = trainkit.get_context()
    rank = ctx.get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    step = resume_step()
    put(config["dir"], f"start-a{attempt}-rank{rank}.json", step)
    while step < 40:
        step += 1
        if attempt == 1 and rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice, as a cloud VM gets it
            wait_for(ctx.is_preempted, 20, "is_preempted() after SIGTERM")
            put(config["dir"], "noticed-at.json", step)
        trainkit.report({"step": step, "attempt": attempt},
                        checkpoint=checkpoint_with({"step": step}) if rank == 0 else None)
        if attempt > 1 and step >= config["until"]:
            return step


@case("PREEMPT-001", "preemption", "SIGTERM to a worker is a preemption notice: the rank sees is_preempted(), "
      "the run saves a checkpoint, restarts from it, and the restart does not count against max_failures.",
      requires=[MULTI_WORKER, PREEMPTION], extension=True)
def test_sigterm_is_a_preemption_not_a_failure(tk):
    result = tk.fit(_preempted_loop, workers=2, config={"dir": tk.dir, "until": 8}, max_failures=0)
    noticed = tk.read("noticed-at.json")
    assert result.error is None
    assert tk.read("start-a2-rank0.json") >= noticed, \
        "the restart did not resume from a checkpoint saved after the notice"
    assert result.metrics["attempt"] >= 2


# -- hang diagnosis ----------------------------------------------------------------------------------
def stuck_in_user_code(seconds: float) -> None:
    time.sleep(seconds)  # a rank stuck in user code (the stimulus)


def _one_rank_hangs(config):
    rank = trainkit.get_context().get_world_rank()
    trainkit.report({"step": 1})
    if rank == 1:
        stuck_in_user_code(config["hang_s"])
    trainkit.report({"step": 2})


@case("HANG-001", "hang", "With HangConfig(timeout_s=T, action='fail'), ranks waiting at a report barrier for "
      "longer than T fail the run with HangDetectedError naming the missing rank.",
      requires=[MULTI_WORKER, HANG_DIAGNOSTICS], extension=True, pending="hang_watchdog",
      ray_train=_RT_HANG, ray_train_match=r"fit\(\) returned")
def test_hang_fails_the_run_naming_the_missing_rank(tk):
    t0 = time.monotonic()
    err = tk.fails(_one_rank_hangs, workers=2, config={"hang_s": 60},
                   hang_config=trainkit.HangConfig(timeout_s=2, action="fail"))
    assert isinstance(err, trainkit.HangDetectedError), type(err)
    assert "rank 1" in str(err)
    assert time.monotonic() - t0 < 45


@case("HANG-002", "hang", "A detected hang writes a hang_detected event naming the missing ranks and their "
      "stacks under diagnostics/, showing the user's function.",
      requires=[MULTI_WORKER, HANG_DIAGNOSTICS], extension=True, pending="hang_watchdog",
      ray_train=_RT_HANG, ray_train_match=r"fit\(\) returned")
def test_hang_writes_stacks_naming_the_user_frame(tk):
    tk.fails(_one_rank_hangs, workers=2, config={"hang_s": 60}, name="hung",
             hang_config=trainkit.HangConfig(timeout_s=2, action="fail"))
    hangs = [e for e in read_run_dicts(tk.run_path("hung")) if e["type"] == "hang_detected"]
    assert hangs and list(hangs[0]["missing_ranks"]) == [1]
    diag = os.path.join(tk.run_path("hung"), "diagnostics")
    text = ""
    for root, _, files in os.walk(diag):
        for n in files:
            with open(os.path.join(root, n), errors="replace") as f:
                text += f.read()
    assert "stuck_in_user_code" in text, f"no stack under {diag} shows the user's function"


@case("HANG-003", "hang", "With action='warn', a hang is recorded (hang_detected event) and the run still "
      "finishes when the slow rank arrives.", requires=[MULTI_WORKER, HANG_DIAGNOSTICS], extension=True,
      pending="hang_watchdog", ray_train=_RT_HANG, ray_train_match="no hang_detected")
def test_hang_warning_lets_the_run_finish(tk):
    result = tk.fit(_one_rank_hangs, workers=2, config={"hang_s": 5}, name="slow",
                    hang_config=trainkit.HangConfig(timeout_s=1.5, action="warn"))
    events = read_run_dicts(tk.run_path("slow"))  # no file: no events
    assert any(e["type"] == "hang_detected" for e in events), "no hang_detected event was recorded"
    assert result.metrics == {"step": 2}
