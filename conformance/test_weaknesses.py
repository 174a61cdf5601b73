"""Cases: the weak spots of Ray Train 2.60 that the reference lists (ray-train-semantics.md §20), one each.

Each states the behaviour a user can rely on where Ray Train is weak: a caught report() error
does not deadlock the next report, a repeated checkpoint_dir_name never deletes the live
checkpoint, Result.from_path keeps the retention order, a relative storage_path is refused
up front, and ranks saving the same file name leave one whole copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import trainkit
from conformance.case import case
from conformance.harness import checkpoint_files, checkpoint_with, put, resume_step
from trainkit.backends.api import MULTI_WORKER


def _workers(tk) -> int:
    return 2 if MULTI_WORKER in tk.capabilities else 1


def _report_after_caught_error(config):
    ckpt = checkpoint_with({"step": 1})
    shutil.rmtree(ckpt.path)  # the stimulus: the folder is gone when report() reads it
    try:
        trainkit.report({"step": 1}, checkpoint=ckpt)
        caught = None
    except Exception as e:  # noqa: BLE001 - the user's loop catches it and goes on
        caught = type(e).__name__
    trainkit.report({"step": 2}, checkpoint=checkpoint_with({"step": 2}))
    put(config["dir"], f"caught-{trainkit.get_context().get_world_rank()}.json", caught)


@case("REPORT-010", "report", "A report() that raised on every rank (its checkpoint folder was gone) and was caught "
      "leaves the ranks able to report again: the next report() commits.", extension=True, bound_s=120,
      ray_train="Ray Train 2.60 counts the failed report() before its barrier: the next report() on that worker "
      "waits forever for an index that never comes, so the case's bound ends the run (reference §7.7, W6, "
      "E5 report_after_exc).", ray_train_raises="CaseTimeout")
def test_a_caught_report_error_does_not_deadlock_the_next_report(tk):
    workers = _workers(tk)
    result = tk.fit(_report_after_caught_error, workers=workers, config={"dir": tk.dir})
    assert result.metrics == {"step": 2}, result.metrics
    assert checkpoint_files(result.checkpoint) == {"step": 2}
    for r in range(workers):
        assert tk.read(f"caught-{r}.json") is not None, f"rank {r}'s report() of a missing folder did not raise"


def _same_dir_name(config):
    start = resume_step()
    put(config["dir"], f"start-run{config['run']}.json", start)
    for step in range(start + 1, start + 3):
        trainkit.report({"step": step}, checkpoint=checkpoint_with({"step": step}), checkpoint_dir_name="latest")


@case("CKPT-009", "checkpoints", "Reporting twice into the same checkpoint_dir_name with num_to_keep=1 never "
      "deletes the live checkpoint: Result.checkpoint exists and holds the last files, and a new fit() resumes "
      "from it.", extension=True,
      ray_train="Ray Train 2.60 registers both reports as checkpoints of one folder and, retaining one, deletes the "
      "older entry's folder, which is the live checkpoint: Result.checkpoint.path does not exist (reference §6.2.7, "
      "W7, E8).", ray_train_match="does not exist")
def test_a_repeated_checkpoint_dir_name_keeps_the_live_checkpoint(tk):
    cc = trainkit.CheckpointConfig(num_to_keep=1)
    result = tk.fit(_same_dir_name, config={"dir": tk.dir, "run": 1}, name="samename", checkpoint_config=cc)
    assert os.path.isdir(result.checkpoint.path), f"Result.checkpoint {result.checkpoint.path} does not exist"
    assert checkpoint_files(result.checkpoint) == {"step": 2}
    tk.fit(_same_dir_name, config={"dir": tk.dir, "run": 2}, name="samename", checkpoint_config=cc)
    assert tk.read("start-run2.json") == 2, "the new fit() did not resume from the live checkpoint"


def _scored(config):
    for step, score in enumerate(config["scores"], start=1):
        trainkit.report({"step": step, "score": score}, checkpoint=checkpoint_with({"step": step}))


@case("PERSIST-008", "persistence", "Result.from_path of a run with num_to_keep=2 and score order 'max' gives the "
      "same best_checkpoints, in the same order, as the live Result.",
      ray_train="Ray Train 2.60's Result.from_path ignores the run's CheckpointConfig: its best_checkpoints also "
      "hold the retained latest checkpoint, in report order (reference §10.7, W9, E2 from_path).",
      ray_train_match="from_path")
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_from_path_keeps_the_retention_order(tk, storage):
    path = tk.storage_for(storage)
    cc = trainkit.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="max")
    live = tk.fit(_scored, config={"scores": [5, 1, 3, 4, 2]}, checkpoint_config=cc, storage_path=path)
    loaded = tk.result_from_path(tk.uri_of(path, live.path))  # on S3 result.path has no scheme (as in Ray Train)
    want = [m["step"] for _, m in live.best_checkpoints]
    got = [m["step"] for _, m in loaded.best_checkpoints]
    assert want == [4, 1], f"the live best_checkpoints are steps {want}"
    assert got == want, f"from_path best_checkpoints are steps {got}, the live Result's {want}"


@case("API-007", "api", "A relative storage_path is refused when the RunConfig is made, with a ValueError naming "
      "storage_path, before any worker starts.", shared=True)
def test_a_relative_storage_path_is_refused(tk):
    with pytest.raises(ValueError, match="storage_path"):
        trainkit.RunConfig(name="rel", storage_path="relative_dir")
    assert not os.path.exists(os.path.join(os.getcwd(), "relative_dir", "rel"))


def _same_file_name(config):
    rank = trainkit.get_context().get_world_rank()
    payload = (f"rank {rank} " * 200_000).encode()  # 1.4 MB: a torn mix of two copies would show
    folder = checkpoint_with({})
    with open(os.path.join(folder.path, "model.bin"), "wb") as f:
        f.write(payload)
    put(config["dir"], f"digest-{rank}.json", hashlib.sha256(payload).hexdigest())
    trainkit.report({"step": 1}, checkpoint=folder)


@case("CKPT-010", "checkpoints", "When every rank saves a file of the same name in one round, the committed "
      "checkpoint holds one rank's copy whole, never a mix.", requires=[MULTI_WORKER])
def test_ranks_writing_the_same_file_name_leave_one_whole_copy(tk):
    result = tk.fit(_same_file_name, workers=2, config={"dir": tk.dir})
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "model.bin"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    assert digest in (tk.read("digest-0.json"), tk.read("digest-1.json")), \
        "the committed model.bin is neither rank's copy (a torn mix)"


def _options_seen(config):
    import ray

    ctx = trainkit.get_context()
    put(config["dir"], f"opts-{ctx.get_world_rank()}.json", {
        "env": os.environ.get("TKCONF_PROBE"), "node": ray.get_runtime_context().get_node_id()})


@case("API-008", "api", "No trainer option is silently ignored: RunConfig.worker_runtime_env reaches every rank "
      "and ScalingConfig(placement_strategy='STRICT_SPREAD') puts 2 ranks on 2 nodes, or fit() raises a ValueError "
      "naming the option.", requires=[MULTI_WORKER])
def test_no_option_is_silently_ignored(tk):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    if len(nodes) < 2:
        pytest.skip("needs a Ray cluster of two nodes with CPUs (the suite's private Ray has them)")
    if tk.backend_name == "ray":  # warm idle groups of earlier cases may hold a node's CPUs
        from trainkit.backends.ray import release_warm_workers

        release_warm_workers()
    try:
        tk.fit(_options_seen, workers=2, config={"dir": tk.dir},
               run_options={"worker_runtime_env": {"env_vars": {"TKCONF_PROBE": "seen"}}},
               scaling_options={"placement_strategy": "STRICT_SPREAD"})
    except ValueError as e:
        assert "worker_runtime_env" in str(e) or "placement_strategy" in str(e), f"the refusal names no option: {e}"
        return
    seen = [tk.read(f"opts-{r}.json") for r in (0, 1)]
    assert [s["env"] for s in seen] == ["seen", "seen"], f"worker_runtime_env was ignored: ranks saw {seen}"
    assert seen[0]["node"] != seen[1]["node"], "placement_strategy='STRICT_SPREAD' was ignored: both ranks on one node"
