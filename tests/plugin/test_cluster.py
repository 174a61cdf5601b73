"""The Ray-backed fixtures, end to end: an inner pytest session in a subprocess starts a real fake cluster.

One inner session (so one cluster start) checks: a 4-rank run under ``--trainkit-workers=4``
sees world size 4 on 2 virtual nodes; datasets from ``fake_rows`` are sharded; objects
written through ``s3_storage`` (by the controller and by the ranks) are listed through its
filesystem and a second fit resumes from S3; the marker changes the shape; a failing
test and a hanging test print the diagnosis section; and no Ray process is left after
the session. The last test runs a small suite under ``-n 2`` (one shared cluster).
"""

from __future__ import annotations

import json
import os

import pytest

from trainkit_testing.cluster import processes_with_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INNER = '''
import json
import os
import threading

import fsspec
import pytest
import trainkit

OUT = os.environ["TK_PLUGIN_OUT"]


def _record(name, data):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(data, f)


def world_fn(config):
    ctx = trainkit.get_context()
    ids = [row["id"] for row in trainkit.get_dataset_shard("train")]
    with open(os.path.join(config["dir"], f"rank-{ctx.get_world_rank()}.json"), "w") as f:
        json.dump({"world_size": ctx.get_world_size(), "node_id": ctx.get_node_id(),
                   "node_rank": ctx.get_node_rank(), "local_rank": ctx.get_local_rank(), "ids": ids}, f)
    trainkit.report({"world_size": ctx.get_world_size()})


def test_four_ranks_see_world_size_four_on_two_virtual_nodes(run_training, trainkit_cluster, trainkit_workers,
                                                               scaling_config, fake_rows, tmp_path):
    _record("cluster.json", {"ray_tmpdir": trainkit_cluster.ray_tmpdir, "nodes": trainkit_cluster.nodes})
    assert trainkit_workers == 4 and scaling_config.num_workers == 4
    result = run_training(world_fn, {"dir": str(tmp_path)}, datasets={"train": fake_rows(42)})
    assert result.metrics == {"world_size": 4}
    ranks = [json.load(open(tmp_path / f"rank-{r}.json")) for r in range(4)]
    assert {r["world_size"] for r in ranks} == {4}
    nodes = {r["node_id"] for r in ranks}
    assert len(nodes) == 2 and nodes <= set(trainkit_cluster.node_ids())
    assert sorted((r["node_rank"], r["local_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted(i for r in ranks for i in r["ids"]) == list(range(42))


def s3_fn(config):
    ctx = trainkit.get_context()
    start = trainkit.get_checkpoint()
    step = 0
    if start is not None:
        with start.as_directory() as d, open(os.path.join(d, "step")) as f:
            step = int(f.read())
    # credentials and endpoint reach the ranks: a plain fsspec write from every rank
    with fsspec.open(f"{config['extra']}/rank-{ctx.get_world_rank()}-from-{step}.txt", "w") as f:
        f.write("hello")
    for _ in range(2):
        step += 1
        d = os.path.join(config["tmp"], f"rank{ctx.get_world_rank()}-step{step}")
        os.makedirs(d)
        if ctx.get_world_rank() == 0:
            with open(os.path.join(d, "step"), "w") as f:
                f.write(str(step))
        trainkit.report({"step": step}, checkpoint=trainkit.Checkpoint.from_directory(d))


def test_s3_runs_are_listed_through_the_fixture_fs_and_resume(run_training, s3_storage, tmp_path):
    extra = f"s3://{s3_storage.bucket}/extra"
    rc = trainkit.RunConfig(name="resume-me")
    first = run_training(s3_fn, {"tmp": str(tmp_path / "a"), "extra": extra}, storage=s3_storage, run_config=rc)
    second = run_training(s3_fn, {"tmp": str(tmp_path / "b"), "extra": extra}, storage=s3_storage, run_config=rc)
    assert first.metrics["step"] == 2 and second.metrics["step"] == 4
    objects = s3_storage.ls("resume-me")
    assert f"{s3_storage.path}/resume-me/run_state.json" in objects
    assert f"{s3_storage.path}/resume-me/events.jsonl" in objects
    assert any("/resume-me/checkpoint_" in p and p.endswith("/step") for p in objects)
    written = sorted(p.rsplit("/", 1)[1] for p in s3_storage.fs.find(f"{s3_storage.bucket}/extra"))
    assert written == sorted(f"rank-{r}-from-{s}.txt" for r in range(4) for s in (0, 2))


@pytest.mark.trainkit(workers=2, nodes=1)
def test_the_marker_gives_two_ranks_on_one_node(run_training, tmp_path, fake_rows):
    result = run_training(world_fn, {"dir": str(tmp_path)}, datasets={"train": fake_rows(4)})
    assert result.metrics == {"world_size": 2}
    ranks = [json.load(open(tmp_path / f"rank-{r}.json")) for r in range(2)]
    assert len({r["node_id"] for r in ranks}) == 1


def failing_fn(config):
    for step in range(3):
        if step == 1 and trainkit.get_context().get_world_rank() == 1:
            raise ValueError("loss is NaN at step 1")
        trainkit.report({"step": step})


def test_fails_with_a_root_cause(run_training):
    run_training(failing_fn)


def wait_forever_in_user_code():
    threading.Event().wait()


def hanging_fn(config):
    trainkit.report({"step": 0})
    if trainkit.get_context().get_world_rank() == 3:
        wait_forever_in_user_code()
    trainkit.report({"step": 1})


def test_hangs_and_names_the_missing_rank(run_training, pytestconfig):
    assert pytestconfig.getoption("trainkit_hang_timeout") == 120.0
    hang = trainkit.HangConfig(timeout_s=3, action="fail")
    run_training(hanging_fn, run_config=trainkit.RunConfig(hang_config=hang))
'''


@pytest.mark.timeout(600)
def test_the_fake_cluster_fixtures_end_to_end(pytester, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pytester.makepyfile(test_inner=INNER)
    os.environ["TK_PLUGIN_OUT"] = str(out)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-v",
                                               "--trainkit-workers=4", "--trainkit-hang-timeout=120",
                                               timeout=540)
    finally:
        os.environ.pop("TK_PLUGIN_OUT")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines([
        "*_ test_fails_with_a_root_cause _*",
        "*- trainkit run -*",
        "run folder: */test_fails_with_a_root_cause-*-run1",
        "*rank 1*ValueError: loss is NaN at step 1*",
    ])
    result.stdout.fnmatch_lines([
        "*_ test_hangs_and_names_the_missing_rank _*",
        "*- trainkit run -*",
        "run folder: */test_hangs_and_names_the_missing_rank-*/trainkit_run-*",
        "*3*wait_forever_in_user_code*",
    ])
    cluster = json.loads((out / "cluster.json").read_text())
    assert cluster["nodes"] == 2
    assert not os.path.exists(cluster["ray_tmpdir"]), "the cluster's private RAY_TMPDIR is removed at the end"
    assert processes_with_env(f"RAY_TMPDIR={cluster['ray_tmpdir']}") == []


XDIST_INNER = '''
import json
import os

import pytest
import trainkit

OUT = os.environ["TK_PLUGIN_OUT"]


def fn(config):
    ctx = trainkit.get_context()
    for step in range(3):
        trainkit.report({"step": step, "world_size": ctx.get_world_size()},
                        checkpoint=None)


@pytest.mark.parametrize("i", range(4))
def test_fit(run_training, trainkit_cluster, worker_id, i):
    assert run_training(fn).metrics == {"step": 2, "world_size": 2}
    with open(os.path.join(OUT, f"{worker_id}-{i}.json"), "w") as f:
        json.dump({"ray_tmpdir": trainkit_cluster.ray_tmpdir, "shared": trainkit_cluster.shared,
                   "owner": trainkit_cluster.owner, "pid": os.getpid()}, f)


@pytest.mark.parametrize("i", range(4))
def test_s3(run_training, s3_storage, i):
    result = run_training(fn, storage=s3_storage)
    assert result.metrics["step"] == 2
    assert any(p.endswith("/run_state.json") for p in s3_storage.ls())
'''


@pytest.mark.timeout(600)
def test_the_suite_passes_under_xdist_with_one_shared_cluster(pytester, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pytester.makepyfile(test_xdist_inner=XDIST_INNER)
    os.environ["TK_PLUGIN_OUT"] = str(out)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", timeout=540)
    finally:
        os.environ.pop("TK_PLUGIN_OUT")
    result.assert_outcomes(passed=8)
    seen = [json.loads(p.read_text()) for p in out.iterdir()]
    assert len(seen) == 4
    tmpdirs = {s["ray_tmpdir"] for s in seen}
    assert len(tmpdirs) == 1, f"both xdist workers must share one cluster, saw {tmpdirs}"
    if len({s["pid"] for s in seen}) == 2:  # both workers ran a fit: one started it, the other joined
        assert {s["owner"] for s in seen} == {True, False}
    (tmpdir,) = tmpdirs
    assert processes_with_env(f"RAY_TMPDIR={tmpdir}") == []
