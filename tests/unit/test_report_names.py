"""Pure parts of issue 14's Ray Train names: the configs' validation, the hang error kind, the enums."""

from __future__ import annotations

import pytest

from trainkit import (BackendConfig, CheckpointConfig, CheckpointUploadMode, ConfigError, FailureConfig,
                      HangDetectedError, LoggingConfig, NCCLHangError, RunConfig, ScalingConfig, SyncConfig,
                      ValidationConfig, ValidationTaskConfig)
from trainkit.diagnostics.hang import hang_error_class
from trainkit.errors import DeprecatedSettingError


def test_an_nccl_hang_is_named_only_when_a_missing_rank_is_stuck_in_a_collective_on_nccl():
    assert hang_error_class(["collective"], "nccl") is NCCLHangError
    assert hang_error_class(["user_code", "collective"], "nccl") is NCCLHangError
    assert hang_error_class(["user_code"], "nccl") is HangDetectedError
    assert hang_error_class(["collective"], "gloo") is HangDetectedError
    assert issubclass(NCCLHangError, HangDetectedError)


@pytest.mark.parametrize("make", [
    lambda: RunConfig(sync_config=SyncConfig()), lambda: RunConfig(verbose=1), lambda: RunConfig(stop={"i": 1}),
    lambda: RunConfig(progress_reporter=object()), lambda: RunConfig(log_to_file=True),
    lambda: FailureConfig(fail_fast=True), lambda: CheckpointConfig(checkpoint_frequency=1),
    lambda: CheckpointConfig(checkpoint_at_end=True)], ids=range(8))
def test_settings_ray_train_v2_removed_raise_a_deprecation_that_is_also_a_config_error(make, tmp_path):
    with pytest.raises(DeprecatedSettingError) as info:
        make()
    assert isinstance(info.value, DeprecationWarning) and isinstance(info.value, ConfigError)
    assert "is not supported" in str(info.value)


def test_failure_config_takes_rays_names_and_max_preemption_failures_is_max_preemptions():
    fc = FailureConfig(max_preemption_failures=2, controller_failure_limit=3, preemption_grace_s=5.0,
                       relax_collectives_on_preemption=True)
    assert fc.max_preemptions == 2 and fc.max_preemption_failures == 2 and fc.controller_failure_limit == 3
    assert FailureConfig(max_preemptions=4).max_preemption_failures == 4
    with pytest.raises(ConfigError, match="max_preemption_failures"):
        FailureConfig(max_preemptions=1, max_preemption_failures=2)
    with pytest.raises(ConfigError, match="preemption_grace_s"):
        FailureConfig(preemption_grace_s=-1)


def test_scaling_config_takes_rays_other_fields():
    sc = ScalingConfig(num_workers=2, accelerator_type="A100", label_selector=[{"a": "1"}, {"a": "2"}],
                       elastic_resize_monitor_interval_s=5)
    assert sc.worker_resources == {"CPU": 1, "accelerator_type:A100": 0.001}
    with pytest.raises(ConfigError, match="label_selector"):
        ScalingConfig(num_workers=2, label_selector=[{"a": "1"}])
    with pytest.raises(ConfigError, match="use_tpu"):
        ScalingConfig(use_tpu=True)
    with pytest.raises(ConfigError, match="elastic_resize_monitor_interval_s"):
        ScalingConfig(elastic_resize_monitor_interval_s=-1)


def test_logging_validation_and_upload_mode_configs_validate_like_rays():
    assert LoggingConfig("warning").log_level == "WARNING"
    with pytest.raises(ConfigError, match="LoggingConfig.log_level"):
        LoggingConfig("chatty")
    with pytest.raises(ConfigError, match="timeout_s"):
        ValidationTaskConfig(timeout_s=0)
    assert ValidationTaskConfig().fn_kwargs == {}
    with pytest.raises(ConfigError, match="ValidationConfig.fn"):
        ValidationConfig(fn=3)
    assert ValidationConfig(lambda c: {}).task_config == ValidationTaskConfig()
    assert CheckpointUploadMode.ASYNC.default_delete_local_checkpoint_after_upload()
    assert not CheckpointUploadMode.SYNC.default_delete_local_checkpoint_after_upload()
    assert BackendConfig().to_dict() == {}


def test_preemptions_past_max_preemptions_end_the_run_with_a_preemption_error_naming_the_ranks():
    from trainkit.backends.decide import Budget, Fail, Outcome, decide
    from trainkit.errors import PreemptionError, WorkerFailure

    notice = WorkerFailure(world_rank=1, node_id="n1", kind="preempted", message="preempted")
    action, _ = decide(Outcome(failures=(notice,)), Budget(), FailureConfig(max_preemption_failures=0))
    assert isinstance(action, Fail) and type(action.error) is PreemptionError
    assert action.error.preemption_info.preempted_node_to_ranks == {"n1": [1]}
    died = WorkerFailure(world_rank=0, kind="died", message="gone")
    action, _ = decide(Outcome(failures=(died,)), Budget(), FailureConfig())
    assert not isinstance(action.error, PreemptionError)


# -- Session: ASYNC ordering with a coordinator that holds each round (no Ray) ----------------------------
class _HeldCoordinator:
    """Holds every report round until ``release`` is set; records the calls in order."""

    def __init__(self):
        import threading

        self.release = threading.Event()
        self.calls = []

    def report(self, world_rank, index, metrics, checkpoint_dir, files):
        from trainkit.session import ReportReply

        assert self.release.wait(30)
        self.calls.append(("report", index, checkpoint_dir))
        return ReportReply(checkpoint_dir)

    def collective(self, world_rank, op, seq, payload):
        self.calls.append((op, seq))
        return payload

    def reported_checkpoints(self):
        return []


def _session(tmp_path, coordinator):
    from trainkit.session import RankInfo, Session
    from trainkit.storage import RunStore

    store = RunStore(str(tmp_path / "storage"), "run")
    return Session(RankInfo(), store, coordinator, experiment_name="run")


def test_an_async_report_returns_while_its_round_is_held_and_the_next_call_waits_for_it(tmp_path):
    from trainkit import Checkpoint

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "w.txt").write_text("1")
    coord = _HeldCoordinator()
    s = _session(tmp_path, coord)
    s.report({"i": 1}, Checkpoint.from_directory(str(src)), checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    assert coord.calls == [] and s.checkpoint is None and s.index == 0  # returned; the round is still held
    coord.release.set()
    s.collective("barrier")  # acknowledges report 1 first
    assert coord.calls == [("report", 1, "checkpoint_1"), ("barrier", 1)]
    assert s.index == 1 and s.checkpoint.path.endswith("checkpoint_1") and not src.exists()


def test_an_async_upload_error_is_raised_at_the_ranks_next_call(tmp_path):
    from trainkit import Checkpoint

    coord = _HeldCoordinator()
    coord.release.set()
    s = _session(tmp_path, coord)
    s.report({"i": 1}, Checkpoint.from_directory(str(tmp_path / "missing")),
             checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    with pytest.raises(FileNotFoundError):
        s.drain()
    s.drain()  # raised once
    assert coord.calls == []


def test_torch_helpers_removed_in_ray_train_v2_raise_a_deprecation_and_enable_reproducibility_is_rays(monkeypatch):
    import random

    import torch

    from trainkit import torch as tkt

    for call in (lambda: tkt.prepare_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)),
                 lambda: tkt.backward(torch.zeros(1)), lambda: tkt.accelerate(amp=True)):
        with pytest.raises(DeprecationWarning, match="torch.autocast"):
            call()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        tkt.enable_reproducibility(seed=7)
        first = (torch.rand(1).item(), random.random())
        tkt.enable_reproducibility(seed=7)
        assert (torch.rand(1).item(), random.random()) == first
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is False
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_torch_checkpoint_round_trips_a_state_dict_and_a_model():
    import torch

    from trainkit.torch import TorchCheckpoint

    model = torch.nn.Linear(2, 1)
    back = TorchCheckpoint.from_state_dict(model.state_dict()).get_model(torch.nn.Linear(2, 1))
    assert torch.equal(back.weight, model.weight)
    assert torch.equal(TorchCheckpoint.from_model(model).get_model().weight, model.weight)
    assert TorchCheckpoint.from_model(model).get_preprocessor() is None
