"""Inputs accepted wrongly before get a ConfigError naming the setting and what is allowed, before any
side effect: storage URIs without a bucket or with a relative path, an empty run name, metrics JSON
cannot hold, a checkpoint "folder" that is a file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import trainkit
from trainkit import Checkpoint, RunConfig, ScalingConfig
from trainkit.errors import ConfigError
from trainkit.session import validate_metrics
from trainkit.trainer import DataParallelTrainer


@pytest.mark.parametrize("storage_path,allowed", [
    ("s3://", "naming a bucket"),
    ("s3:///prefix", "naming a bucket"),
    ("gs://", "naming a bucket"),
    ("file://relative/dir", "absolute file://"),
])
def test_a_storage_uri_without_a_bucket_or_with_a_relative_path_is_refused(tmp_path, storage_path, allowed):
    with pytest.raises(ConfigError) as info:
        RunConfig(name="run", storage_path=storage_path)
    assert "RunConfig.storage_path" in str(info.value) and allowed in str(info.value)
    assert repr(storage_path) in str(info.value)


def test_an_absolute_file_uri_is_its_path(tmp_path):
    assert RunConfig(name="run", storage_path=f"file://{tmp_path}").storage_path == str(tmp_path)


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_run_name_is_refused(name):
    with pytest.raises(ConfigError, match=r"RunConfig\.name=.* non-empty folder name, or None"):
        RunConfig(name=name)


def test_a_missing_run_name_still_gets_a_generated_one():
    assert RunConfig().name.startswith("trainkit_run-")


def _report_seen(tmp_path, metrics):
    seen = []

    def train_fn():
        try:
            trainkit.report(metrics)
        except ConfigError as e:
            seen.append(e)

    result = DataParallelTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0),
                                 run_config=RunConfig(name="run", storage_path=str(tmp_path))).fit()
    return seen, result


@pytest.mark.parametrize("value,key", [
    (np.zeros(3), "'weights'"),
    (lambda: 1, "'weights'"),
    (b"raw", "'weights'"),
    ({"inner": object()}, "'weights']['inner'"),
    ([1, np.zeros(2)], "'weights'][1"),
])
def test_a_metric_json_cannot_hold_is_refused_by_report_naming_its_key(tmp_path, value, key):
    seen, result = _report_seen(tmp_path, {"step": 1, "weights": value})
    assert len(seen) == 1
    message = str(seen[0])
    assert f"report(metrics)[{key}]" in message and "JSON value" in message
    assert result.metrics is None  # nothing committed
    assert not [line for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
                if "report_committed" in line]


def test_a_refused_metric_error_pickles():
    import pickle

    with pytest.raises(ConfigError) as info:
        validate_metrics({"f": lambda: 1})
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_numpy_scalars_become_python_numbers(tmp_path):
    metrics = {"loss": np.float32(0.5), "step": np.int64(3), "done": np.bool_(True), "hist": [np.float64(1.5)]}
    plain = validate_metrics(metrics)
    assert plain == {"loss": 0.5, "step": 3, "done": True, "hist": [1.5]}
    assert type(plain["loss"]) is float and type(plain["step"]) is int and type(plain["done"]) is bool
    assert type(plain["hist"][0]) is float  # np.float64 is a float subclass: made plain too
    seen, result = _report_seen(tmp_path, metrics)
    assert not seen and result.metrics == {"loss": 0.5, "step": 3, "done": True, "hist": [1.5]}
    committed = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
                 if "report_committed" in line]
    assert committed[0]["metrics"]["done"] is True


def test_nan_and_nested_plain_values_are_accepted():
    m = {"loss": float("nan"), "per_class": {"a": 1, "b": [1, 2.5, None, "x"]}}
    assert validate_metrics(m)["per_class"] == m["per_class"]


def test_checkpoint_from_a_file_says_the_path_is_a_file(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"w")
    with pytest.raises(ConfigError) as info:
        Checkpoint.from_directory(f)
    assert "Checkpoint.from_directory(path)" in str(info.value) and "is a file" in str(info.value)
    assert "a folder" in str(info.value)


def test_reporting_a_checkpoint_whose_folder_became_a_file_says_so(tmp_path):
    seen = []
    d = tmp_path / "ckpt"

    def train_fn():
        d.mkdir()
        ckpt = Checkpoint.from_directory(d)
        d.rmdir()
        d.write_bytes(b"now a file")
        try:
            trainkit.report({"step": 1}, checkpoint=ckpt)
        except ConfigError as e:
            seen.append(e)

    DataParallelTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0),
                        run_config=RunConfig(name="run", storage_path=str(tmp_path / "s"))).fit()
    assert len(seen) == 1 and "is a file" in str(seen[0])
    assert not os.path.exists(tmp_path / "s" / "run" / "checkpoint_1")
