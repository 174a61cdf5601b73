"""Checkpoints and whole runs on s3:// (s3fs) against a moto server, as on a real bucket.

Each test gets a fresh bucket from the plugin's ``s3_storage`` fixture, its credentials and
endpoint in this process's environment (what a plain ``s3fs.S3FileSystem()`` reads).
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

import trainkit
from trainkit import Checkpoint, CheckpointConfig, Result, RunConfig, ScalingConfig
from trainkit.torch import TorchTrainer

pytestmark = pytest.mark.integration


def _s3():
    import s3fs

    return s3fs.S3FileSystem()


def _upload_tree(bucket, prefix, files):
    fs = _s3()
    for rel, data in files.items():
        fs.pipe_file(f"{bucket}/{prefix}/{rel}", data)
    return f"s3://{bucket}/{prefix}"


def _read_tree(root):
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root).replace(os.sep, "/")] = f.read()
    return out


_FILES = {"model.pt": b"weights", "sub/optim.pt": b"state"}


def test_checkpoint_on_s3_downloads_with_to_directory_and_as_directory(s3_storage, tmp_path):
    ckpt = Checkpoint(_upload_tree(s3_storage.bucket, "ckpts/a", _FILES))
    assert ckpt.uri == f"s3://{s3_storage.bucket}/ckpts/a"
    out = ckpt.to_directory(tmp_path / "out")
    assert _read_tree(out) == _FILES
    with ckpt.as_directory() as d:
        assert _read_tree(d) == _FILES
    assert not os.path.exists(d)  # the temporary download is removed


def test_checkpoint_metadata_on_s3(s3_storage):
    s3_bucket = s3_storage.bucket
    ckpt = Checkpoint(_upload_tree(s3_bucket, "ckpts/meta", _FILES))
    assert ckpt.get_metadata() == {}
    ckpt.set_metadata({"epoch": 3})
    ckpt.update_metadata({"lr": 0.01})
    assert Checkpoint(f"s3://{s3_bucket}/ckpts/meta").get_metadata() == {"epoch": 3, "lr": 0.01}
    assert json.loads(_s3().cat_file(f"{s3_bucket}/ckpts/meta/.metadata.json")) == {"epoch": 3, "lr": 0.01}


def _train_func(config):
    ckpt = trainkit.get_checkpoint()
    start = 1
    if ckpt:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "state.json")) as f:
                start = json.load(f)["step"] + 1
    for step in range(start, start + config["steps"]):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"step": step}, f)
            trainkit.report({"step": step, "score": step % 3}, checkpoint=Checkpoint.from_directory(d))
    return start


def _fit(storage, name, steps):
    return TorchTrainer(
        _train_func, train_loop_config={"steps": steps},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="score")),
    ).fit()


def test_a_local_mode_run_on_s3_resumes_by_name_and_loads_with_from_path(s3_storage):
    s3_bucket = s3_storage.bucket
    storage = s3_storage.path
    first = _fit(storage, "s3run", steps=3)
    assert first.return_value == 1
    assert first.metrics == {"step": 3, "score": 0}

    second = _fit(storage, "s3run", steps=2)
    assert second.return_value == 4  # resumed after the first run's last checkpoint
    assert second.error is None
    assert second.metrics == {"step": 5, "score": 2}
    assert list(second.metrics_dataframe["step"]) == [1, 2, 3, 4, 5]

    fs = _s3()
    fs.invalidate_cache()
    run_key = f"{s3_bucket}/runs/s3run"
    assert fs.exists(f"{run_key}/run_state.json")
    assert fs.exists(f"{run_key}/events.jsonl")
    on_s3 = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run_key) if p.rsplit("/", 1)[-1].startswith("checkpoint_"))
    # scores 1,2,0,1,2: the best two are checkpoint_2 and checkpoint_5 (also the latest)
    assert on_s3 == ["checkpoint_2", "checkpoint_5"]

    restored = Result.from_path(f"s3://{s3_bucket}/runs/s3run")
    assert restored.error is None
    assert restored.metrics == second.metrics
    assert [(c.path, m) for c, m in restored.best_checkpoints] == \
        [(c.path, m) for c, m in second.best_checkpoints]
    assert [m["step"] for _, m in restored.best_checkpoints] == [2, 5]
    assert restored.checkpoint.path == second.checkpoint.path == f"{run_key}/checkpoint_5"
    with restored.checkpoint.as_directory() as d:
        with open(os.path.join(d, "state.json")) as f:
            assert json.load(f) == {"step": 5}
    assert list(restored.metrics_dataframe["step"]) == [1, 2, 3, 4, 5]
