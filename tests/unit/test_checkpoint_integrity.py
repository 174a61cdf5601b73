"""Checkpoint integrity: the commit records every file's name and size; resume and Result verify them,
skip a damaged or missing checkpoint with a ``checkpoint_skipped`` event and a warning, and fall back
to the latest intact one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

import pytest

import trainkit
from trainkit import Checkpoint, CheckpointConfig, Result, RunConfig, ScalingConfig
from trainkit import events as ev
from trainkit.checkpoint import checkpoint_problem
from trainkit.errors import CheckpointError
from trainkit.ledger import RunLedger
from trainkit.storage import RunStore
from trainkit.trainer import DataParallelTrainer


def _write(path, data: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)


def _counter(steps: int, src_root: str):
    """Resumes from its checkpoint; each report saves model.bin (grows with the step), sub/opt.bin and
    metadata. ``resumed`` in the metrics: the step it started after."""
    def train_fn():
        ckpt = trainkit.get_checkpoint()
        start = ckpt.get_metadata()["step"] if ckpt else 0
        for step in range(start + 1, steps + 1):
            d = os.path.join(src_root, f"{uuid.uuid4().hex}")
            _write(os.path.join(d, "model.bin"), "w" * step)
            _write(os.path.join(d, "sub", "opt.bin"), "o")
            c = Checkpoint.from_directory(d)
            c.set_metadata({"step": step})
            trainkit.report({"step": step, "resumed": start}, checkpoint=c)
    return train_fn


def _fit(tmp_path, steps, name="run", **rc):
    return DataParallelTrainer(_counter(steps, str(tmp_path / "src")), scaling_config=ScalingConfig(num_workers=0),
                               run_config=RunConfig(name=name, storage_path=str(tmp_path / "storage"), **rc)).fit()


def _manifest(tmp_path, name="run"):
    return json.loads((tmp_path / "storage" / name / "run_state.json").read_text())


def _events(tmp_path, name="run"):
    return ev.read_run(tmp_path / "storage" / name)


def test_the_commit_records_every_file_with_its_size(tmp_path):
    _fit(tmp_path, 2)
    entry = _manifest(tmp_path)["checkpoints"][-1]
    assert entry["dir"] == "checkpoint_2"
    assert entry["files"] == {"model.bin": 2, "sub/opt.bin": 1,
                              ".metadata.json": len(json.dumps({"step": 2}))}


def test_a_commit_whose_reported_file_is_not_in_storage_is_refused(tmp_path):
    store = RunStore(str(tmp_path), "run")
    ledger = RunLedger(store, CheckpointConfig())
    ledger.start_attempt(1)
    _write(os.path.join(store.run_path, "checkpoint_1", "a.bin"), "a")
    with pytest.raises(CheckpointError, match="b.bin"):
        ledger.commit(1, 1, {}, "checkpoint_1", {0: ["a.bin", "b.bin"]})
    assert ledger.state["latest_checkpoint"] is None


@pytest.mark.parametrize("damage,problem", [
    (lambda ck: os.remove(ck / "sub" / "opt.bin"), "sub/opt.bin is missing"),
    (lambda ck: (ck / "model.bin").write_text("w"), "model.bin has 1 bytes, 3 when it was committed"),
    (lambda ck: os.remove(ck / ".metadata.json"), ".metadata.json is missing"),
    (lambda ck: shutil.rmtree(ck), "its folder is missing"),
])
def test_resume_skips_a_damaged_latest_checkpoint_and_falls_back_to_the_latest_intact_one(
        tmp_path, caplog, damage, problem):
    _fit(tmp_path, 3)
    damage(tmp_path / "storage" / "run" / "checkpoint_3")

    with caplog.at_level(logging.WARNING, logger="trainkit"):
        result = _fit(tmp_path, 4)

    assert result.metrics == {"step": 4, "resumed": 2}  # resumed from checkpoint_2, not the damaged 3
    skipped = [e for e in _events(tmp_path) if isinstance(e, ev.CheckpointSkipped)]
    assert [(e.dir, e.index, e.fallback) for e in skipped] == [("checkpoint_3", 3, "checkpoint_2")]
    assert problem in skipped[0].problem
    assert any("checkpoint_3" in r.getMessage() and problem in r.getMessage() for r in caplog.records)
    started = [e for e in _events(tmp_path) if isinstance(e, ev.RunStarted)]
    assert started[-1].resumed_from_index == 2
    assert result.checkpoint.get_metadata() == {"step": 4}
    assert [r["step"] for r in result.metrics_dataframe.to_dict("records")] == [1, 2, 3, 4]


def test_result_from_path_falls_back_from_a_damaged_latest_checkpoint_with_a_warning(tmp_path):
    _fit(tmp_path, 3)
    run = tmp_path / "storage" / "run"
    os.remove(run / "checkpoint_3" / "model.bin")
    with pytest.warns(RuntimeWarning, match="checkpoint_3.*model.bin is missing.*checkpoint_2"):
        result = Result.from_path(str(run))
    assert result.checkpoint.path.endswith("checkpoint_2")
    assert result.checkpoint.get_metadata() == {"step": 2}
    assert [c.path.rsplit("/", 1)[-1] for c, _ in result.best_checkpoints] == ["checkpoint_1", "checkpoint_2"]
    assert _manifest(tmp_path)["latest_checkpoint"] == "checkpoint_3"  # from_path reads, never writes


def test_a_damaged_checkpoint_is_left_out_of_best_checkpoints(tmp_path):
    _fit(tmp_path, 3, checkpoint_config=CheckpointConfig(checkpoint_score_attribute="step"))
    run = tmp_path / "storage" / "run"
    (run / "checkpoint_2" / "model.bin").write_text("truncated")
    with pytest.warns(RuntimeWarning, match="checkpoint_2"):
        result = Result.from_path(str(run))
    assert [m["step"] for _, m in result.best_checkpoints] == [1, 3]
    assert result.checkpoint.path.endswith("checkpoint_3")


def test_fit_result_verifies_its_checkpoints_and_says_what_it_skipped(tmp_path):
    damaged = []

    def train_fn():
        for step in (1, 2):
            d = str(tmp_path / f"src-{step}")
            _write(os.path.join(d, "model.bin"), "w" * step)
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(d))
        # something removes a committed file before the run ends
        ctx_path = trainkit.get_context().get_storage().path("checkpoint_2", "model.bin")
        os.remove(ctx_path)
        damaged.append(ctx_path)

    result = DataParallelTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0),
                                 run_config=RunConfig(name="run", storage_path=str(tmp_path / "storage"))).fit()
    assert damaged and result.checkpoint.path.endswith("checkpoint_1")
    names = [e.type for e in _events(tmp_path)]
    assert names[-2:] == ["checkpoint_skipped", "run_finished"]


def test_get_metadata_of_a_damaged_checkpoint_raises_instead_of_returning_nothing(tmp_path):
    _fit(tmp_path, 2)
    run = tmp_path / "storage" / "run"
    result = Result.from_path(str(run))
    os.remove(run / "checkpoint_2" / ".metadata.json")
    with pytest.raises(CheckpointError, match=r"checkpoint_2.*\.metadata\.json"):
        result.checkpoint.get_metadata()
    shutil.rmtree(run / "checkpoint_2")
    with pytest.raises(CheckpointError, match="folder is missing"):
        result.checkpoint.get_metadata()


def test_a_plain_checkpoint_without_metadata_still_reads_as_empty(tmp_path):
    (tmp_path / "c").mkdir()
    assert Checkpoint.from_directory(tmp_path / "c").get_metadata() == {}


def test_a_manifest_without_file_lists_is_checked_for_the_folder_only(tmp_path):
    _fit(tmp_path, 2)
    run = tmp_path / "storage" / "run"
    state = _manifest(tmp_path)
    for c in state["checkpoints"]:
        del c["files"]  # as written before file lists were recorded
    (run / "run_state.json").write_text(json.dumps(state))
    os.remove(run / "checkpoint_2" / "model.bin")  # cannot be seen without a file list
    assert Result.from_path(str(run)).checkpoint.path.endswith("checkpoint_2")
    shutil.rmtree(run / "checkpoint_2")
    with pytest.warns(RuntimeWarning, match="folder is missing"):
        assert Result.from_path(str(run)).checkpoint.path.endswith("checkpoint_1")


def test_verification_on_an_object_store_uses_one_listing(tmp_path):
    storage = f"memory://trainkit-test-{uuid.uuid4().hex}/runs"
    src = str(tmp_path / "src")
    result = DataParallelTrainer(_counter(2, src), scaling_config=ScalingConfig(num_workers=0),
                                 run_config=RunConfig(name="run", storage_path=storage)).fit()
    store = RunStore(storage, "run")
    entry = store.read_json("run_state.json")["checkpoints"][-1]
    assert entry["files"]["model.bin"] == 2 and entry["files"]["sub/opt.bin"] == 1
    store.fs.rm(store.path("checkpoint_2", "sub", "opt.bin"))
    with pytest.warns(RuntimeWarning, match="sub/opt.bin is missing"):
        back = Result.from_path(f"{storage}/run")
    assert back.checkpoint.path.endswith("checkpoint_1") and result.checkpoint.path.endswith("checkpoint_2")
    store.fs.rm(store.run_path, recursive=True)


def test_checkpoint_problem_names_what_is_wrong():
    assert checkpoint_problem({"a": 1}, {"a": 1, "new": 5}) is None
    assert checkpoint_problem({".metadata.json": 10}, {".metadata.json": 12}) is None  # set_metadata later
    assert checkpoint_problem({"a": 1}, None) == "its folder is missing"
    assert checkpoint_problem(None, {}) is None
    many = checkpoint_problem({f"f{i}": 1 for i in range(5)}, {})
    assert many.startswith("f0 is missing; f1 is missing; f2 is missing") and "(and 2 more)" in many


def test_checkpoint_skipped_round_trips_through_the_event_stream():
    e = ev.CheckpointSkipped(dir="checkpoint_3", index=3, problem="model.bin is missing", fallback="checkpoint_2")
    assert ev.parse_event(e.to_json()) == e and e.type == "checkpoint_skipped"
