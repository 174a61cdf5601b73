"""Every bad setting of issue 2 raises ConfigError (a ValueError) naming the field, before any work starts."""

from __future__ import annotations

import os
import threading

import pytest

import trainkit
from trainkit import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from trainkit.errors import ConfigError
from trainkit.torch import TorchTrainer


def _raises_config_error(field: str):
    """pytest.raises for ConfigError (a ValueError: test_config_error_is_a_value_error) whose message names ``field``."""
    return pytest.raises(ConfigError, match=field.replace(".", r"\."))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, trainkit.TrainkitError)


def test_negative_num_workers_is_rejected_naming_the_field():
    with _raises_config_error("ScalingConfig.num_workers") as info:
        ScalingConfig(num_workers=-1)
    assert "-1" in str(info.value)


def test_elastic_tuple_with_min_above_max_is_rejected_naming_the_field():
    with _raises_config_error("ScalingConfig.num_workers") as info:
        ScalingConfig(num_workers=(4, 2))
    assert "(4, 2)" in str(info.value)


def test_elastic_tuple_with_min_below_one_is_rejected_naming_the_field():
    with _raises_config_error("ScalingConfig.num_workers") as info:
        ScalingConfig(num_workers=(0, 2))
    assert "min >= 1" in str(info.value)


def test_max_failures_below_minus_one_is_rejected_naming_the_field():
    with _raises_config_error("FailureConfig.max_failures") as info:
        FailureConfig(max_failures=-5)
    assert "-5" in str(info.value)


def test_unknown_placement_strategy_is_rejected_naming_the_field():
    with _raises_config_error("ScalingConfig.placement_strategy") as info:
        ScalingConfig(placement_strategy="SCATTER")
    assert "SCATTER" in str(info.value) and "SPREAD" in str(info.value)


def test_num_to_keep_below_one_is_rejected_naming_the_field():
    with _raises_config_error("CheckpointConfig.num_to_keep") as info:
        CheckpointConfig(num_to_keep=0)
    assert info.value.value == 0 and "num_to_keep=0" in str(info.value)


def test_checkpoint_score_order_outside_min_and_max_is_rejected_naming_the_field():
    with _raises_config_error("CheckpointConfig.checkpoint_score_order") as info:
        CheckpointConfig(checkpoint_score_attribute="loss", checkpoint_score_order="lowest")
    assert "lowest" in str(info.value)


@pytest.mark.parametrize("name", ["runs/a", "runs\\a", ".."])
def test_run_name_with_a_path_separator_is_rejected_naming_the_field(name, tmp_path):
    with _raises_config_error("RunConfig.name") as info:
        RunConfig(name=name, storage_path=str(tmp_path))
    assert info.value.value == name


def test_unsupported_storage_scheme_is_rejected_naming_the_field():
    with _raises_config_error("RunConfig.storage_path") as info:
        RunConfig(name="r", storage_path="ftp://x")
    assert "ftp://x" in str(info.value)


def test_relative_storage_path_is_rejected_naming_the_field():
    with _raises_config_error("RunConfig.storage_path") as info:
        RunConfig(name="r", storage_path="relative/results")
    assert "absolute" in str(info.value)


def test_unpicklable_train_function_is_rejected_by_the_trainer_constructor(tmp_path):
    lock = threading.Lock()
    ran = []

    def train_func():
        with lock:
            ran.append(1)

    with _raises_config_error("train_loop_per_worker") as info:
        TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name="unpicklable", storage_path=str(tmp_path)))
    assert "pickle" in str(info.value)
    assert ran == []
    assert not (tmp_path / "unpicklable").exists()  # nothing started


def test_train_function_with_two_required_arguments_is_rejected_naming_the_field(tmp_path):
    def train_func(config, extra):
        pass

    with _raises_config_error("train_loop_per_worker") as info:
        TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name="twoargs", storage_path=str(tmp_path)))
    assert "2" in str(info.value)
    assert not (tmp_path / "twoargs").exists()


def test_report_with_a_tensor_metric_raises_config_error_naming_the_key(tmp_path):
    import torch

    seen = []

    def train_func():
        try:
            trainkit.report({"step": 1, "loss": torch.tensor(0.5)})
        except ConfigError as e:
            seen.append(e)

    result = TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=0),
                          run_config=RunConfig(name="tensor", storage_path=str(tmp_path))).fit()
    assert len(seen) == 1
    assert "'loss'" in str(seen[0])
    assert "tensor" in str(seen[0]).lower()
    assert result.metrics is None  # the bad report was not committed


def test_scaling_config_defaults_to_one_worker_on_cpu():
    sc = ScalingConfig()
    assert sc.num_workers == 1
    assert sc.use_gpu is False
    assert sc.placement_strategy == "PACK"
    assert not sc.local_mode and not sc.elastic
    assert sc.worker_resources == {"CPU": 1}
    assert ScalingConfig(num_workers=0).local_mode
    assert ScalingConfig(num_workers=(1, 3)).elastic


def test_run_config_default_name_is_unique_per_run():
    names = {RunConfig().name for _ in range(20)}
    assert len(names) == 20
    assert all(n.startswith("trainkit_run-") and "/" not in n for n in names)


def test_run_config_default_storage_path_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINKIT_STORAGE_PATH", str(tmp_path / "from_env"))
    assert RunConfig().storage_path == str(tmp_path / "from_env")
    monkeypatch.delenv("TRAINKIT_STORAGE_PATH")
    assert RunConfig().storage_path == os.path.expanduser("~/trainkit_results")


def test_run_config_fills_default_sub_configs(tmp_path):
    rc = RunConfig(name="r", storage_path=str(tmp_path))
    assert rc.failure_config == FailureConfig()
    assert rc.failure_config.max_failures == 0
    assert rc.checkpoint_config == CheckpointConfig()
    assert rc.checkpoint_config.num_to_keep is None
    assert rc.checkpoint_config.checkpoint_score_order == "max"


def test_valid_edge_values_are_accepted(tmp_path):
    assert FailureConfig(max_failures=-1).max_failures == -1
    assert CheckpointConfig(num_to_keep=1).num_to_keep == 1
    assert ScalingConfig(num_workers=(2, 2)).min_workers == 2
    assert RunConfig(storage_path="s3://bucket/prefix").storage_path == "s3://bucket/prefix"
    assert RunConfig(storage_path="file://" + str(tmp_path)).storage_path == str(tmp_path)


@pytest.mark.parametrize("raw", ["soon", "0", "-5"])
def test_a_bad_worker_start_timeout_is_a_config_error_naming_the_variable(monkeypatch, raw):
    from trainkit.backends.ray import worker_start_timeout_s

    monkeypatch.setenv("TRAINKIT_WORKER_START_TIMEOUT_S", raw)
    with _raises_config_error("TRAINKIT_WORKER_START_TIMEOUT_S") as info:
        worker_start_timeout_s()
    assert raw in str(info.value)


def test_the_worker_start_timeout_is_read_in_the_driver(monkeypatch):
    from trainkit.backends.ray import worker_start_timeout_s

    monkeypatch.setenv("TRAINKIT_WORKER_START_TIMEOUT_S", "12.5")
    assert worker_start_timeout_s() == 12.5
    monkeypatch.delenv("TRAINKIT_WORKER_START_TIMEOUT_S")
    assert worker_start_timeout_s() == 60.0


@pytest.mark.parametrize("raw", ["grpc", "", "1"])
def test_a_bad_report_channel_is_a_config_error_naming_the_variable(monkeypatch, raw):
    from trainkit.backends.ray import report_channel

    monkeypatch.setenv("TRAINKIT_REPORT_CHANNEL", raw)
    with _raises_config_error("TRAINKIT_REPORT_CHANNEL") as info:
        report_channel()
    assert "tcp or ray" in str(info.value)


def test_the_report_channel_is_read_in_the_driver(monkeypatch):
    from trainkit.backends.ray import report_channel

    monkeypatch.setenv("TRAINKIT_REPORT_CHANNEL", " RAY ")
    assert report_channel() == "ray"
    monkeypatch.delenv("TRAINKIT_REPORT_CHANNEL")
    assert report_channel() == "tcp"
