"""Cases: API surface and context (what a rank knows about itself)."""

from __future__ import annotations

import os

import pytest

import trainkit
from conformance.case import case
from conformance.harness import count_attempt, put
from trainkit.backends.api import MULTI_WORKER


# -- API surface ---------------------------------------------------------------------------------
@case("API-001", "api", "The per-rank API (report, get_checkpoint, get_context, get_dataset_shard, "
      "collective.barrier) raises an error saying it cannot be used outside a training function.", shared=True)
def test_per_rank_api_outside_a_training_function_raises(tk):
    calls = {"report": lambda: trainkit.report({"x": 1}), "get_checkpoint": trainkit.get_checkpoint,
             "get_context": trainkit.get_context, "get_dataset_shard": lambda: trainkit.get_dataset_shard("train"),
             "collective.barrier": trainkit.collective.barrier}
    for what, call in calls.items():
        with pytest.raises(RuntimeError, match="cannot be used outside") as info:
            call()
        assert what.split(".")[-1] in str(info.value), f"the error for {what} does not name it: {info.value}"


def _two_args(a, b):  # pragma: no cover - never runs
    return a, b


@case("API-002", "api", "A training function with more than one required argument is rejected before any "
      "worker starts, with an error saying it must take 0 or 1 arguments.", shared=True)
def test_a_train_function_with_two_required_arguments_is_rejected(tk):
    with pytest.raises(ValueError, match="0 or 1"):
        tk.fit(_two_args, workers=1)


def _no_args():
    return "no-args"


def _one_arg(config):
    return {"config": config}


@case("API-003", "api", "A training function may take no argument, or one that receives train_loop_config "
      "(an empty dict when it is None).")
def test_train_function_arity_zero_and_one(tk):
    assert tk.fit(_no_args).return_value == "no-args"
    assert tk.fit(_one_arg, config={"x": 1}).return_value == {"config": {"x": 1}}
    assert tk.fit(_one_arg, config=None).return_value == {"config": {}}


def _recovers(config):
    rank = trainkit.get_context().get_world_rank()
    attempt = count_attempt(config["dir"], rank)
    if rank == 1 and attempt == 1:
        raise RuntimeError("rank 1 fails the first attempt")
    return {"rank": rank, "attempt": attempt}


@case("API-004", "api", "fit() of a run that recovered from a failure returns a Result whose error is None and "
      "whose return_value is rank 0's return value of the final attempt.", requires=[MULTI_WORKER])
def test_fit_of_a_recovered_run_returns_a_clean_result(tk):
    result = tk.fit(_recovers, workers=2, config={"dir": tk.dir}, max_failures=1)
    assert isinstance(result, trainkit.Result)
    assert result.error is None, f"a run that recovered returned Result.error={result.error!r}"
    assert result.return_value == {"rank": 0, "attempt": 2}, result.return_value


@case("API-005", "api", "Invalid ScalingConfig.num_workers values (negative, min > max, float, 3-tuple) "
      "raise a ValueError naming num_workers.", shared=True)
def test_invalid_num_workers_is_rejected(tk):
    for bad in (-1, (4, 2), 2.0, (1, 2, 3)):
        with pytest.raises(ValueError, match="num_workers"):
            trainkit.ScalingConfig(num_workers=bad)
    assert trainkit.ScalingConfig(num_workers=(1, 2)).max_workers == 2


@case("API-006", "api", "Invalid CheckpointConfig values (num_to_keep=0, order 'avg') and FailureConfig "
      "values (max_failures=-5) raise a ValueError naming the field, before any worker starts.", shared=True)
def test_invalid_checkpoint_and_failure_config_is_rejected(tk):
    with pytest.raises(ValueError, match="num_to_keep"):
        trainkit.CheckpointConfig(num_to_keep=0)
    with pytest.raises(ValueError, match="checkpoint_score_order"):
        trainkit.CheckpointConfig(checkpoint_score_order="avg")
    with pytest.raises(ValueError, match="max_failures"):
        trainkit.FailureConfig(max_failures=-5)


# -- context -------------------------------------------------------------------------------------
def _context(config):
    import torch.distributed as dist

    ctx = trainkit.get_context()
    put(config["dir"], f"ctx-{ctx.get_world_rank()}.json", {
        "world_rank": ctx.get_world_rank(), "world_size": ctx.get_world_size(),
        "local_rank": ctx.get_local_rank(), "local_world_size": ctx.get_local_world_size(),
        "node_rank": ctx.get_node_rank(), "name": ctx.get_experiment_name(),
        "dist": dist.is_initialized(), "dist_backend": dist.get_backend() if dist.is_initialized() else None,
        "dist_rank": dist.get_rank() if dist.is_initialized() else None,
        "dist_world": dist.get_world_size() if dist.is_initialized() else None,
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
    })


@case("CTX-001", "context", "With 2 workers on one node the ranks see world ranks {0, 1}, world size 2, "
      "local ranks {0, 1}, local world size 2 and node rank 0.", requires=[MULTI_WORKER])
def test_context_ranks_of_two_workers(tk):
    tk.fit(_context, workers=2, config={"dir": tk.dir})
    seen = list(tk.read_all("ctx-").values())
    assert sorted(c["world_rank"] for c in seen) == [0, 1]
    assert {c["world_size"] for c in seen} == {2}
    assert sorted(c["local_rank"] for c in seen) == [0, 1]
    assert {c["local_world_size"] for c in seen} == {2}
    assert {c["node_rank"] for c in seen} == {0}


@case("CTX-002", "context", "get_context().get_experiment_name() is RunConfig.name on every rank.")
def test_context_experiment_name(tk):
    tk.fit(_context, workers=1, config={"dir": tk.dir}, name="named-run")
    assert {c["name"] for c in tk.read_all("ctx-").values()} == {"named-run"}


@case("CTX-003", "context", "torch.distributed is initialised (gloo on CPU) in every rank, with rank and "
      "world size equal to the context's and RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set to match.",
      requires=[MULTI_WORKER])
def test_torch_distributed_matches_the_context(tk):
    tk.fit(_context, workers=2, config={"dir": tk.dir})
    for c in tk.read_all("ctx-").values():
        assert c["dist"] and c["dist_backend"] == "gloo", c
        assert (c["dist_rank"], c["dist_world"]) == (c["world_rank"], c["world_size"]), c
        env = c["env"]
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == (
            str(c["world_rank"]), str(c["world_size"]), str(c["local_rank"])), env
        assert env["MASTER_ADDR"] and env["MASTER_PORT"], env


def _attempts(config):
    ctx = trainkit.get_context()
    n = count_attempt(config["dir"], ctx.get_world_rank())
    put(config["dir"], f"attempt-{n}-rank{ctx.get_world_rank()}.json", ctx.get_attempt())
    if n == 1:
        raise RuntimeError("fail the first attempt")


@case("CTX-004", "context", "get_context().get_attempt() is 1 in the first attempt and 2 after one restart.",
      extension=True)
def test_context_attempt_counts_restarts(tk):
    tk.fit(_attempts, workers=1, config={"dir": tk.dir}, max_failures=1)
    assert tk.read("attempt-1-rank0.json") == 1
    assert tk.read("attempt-2-rank0.json") == 2
