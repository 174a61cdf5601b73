"""HF Accelerate in a trainkit training function: the documented example (examples/hf_accelerate.py),
run as it is in local mode and on 2 Ray workers, crashing once and resuming from its checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

pytest.importorskip("accelerate")

from trainkit import FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from trainkit.torch import TorchTrainer  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "hf_accelerate.py"
ROWS, BATCH, EPOCHS, CRASH_AT = 64, 8, 3, 1


def _example():
    spec = importlib.util.spec_from_file_location("hf_accelerate_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(storage_path, num_workers):
    return TorchTrainer(_example().train_func, train_loop_config={"epochs": EPOCHS, "crash_at_epoch": CRASH_AT},
                        scaling_config=ScalingConfig(num_workers=num_workers),
                        run_config=RunConfig(name="accelerate", storage_path=storage_path,
                                             failure_config=FailureConfig(max_failures=1))).fit()


def _check(result, world_size):
    assert result.error is None
    df = result.metrics_dataframe
    assert list(df["epoch"]) == list(range(EPOCHS))  # each epoch once: attempt 2 went on after epoch 0
    assert list(df["start_epoch"]) == [0] + [CRASH_AT] * (EPOCHS - CRASH_AT)
    # Accelerate saw trainkit's ranks and split the batches between them.
    assert set(df["num_processes"]) == {world_size}
    assert set(df["batches"]) == {ROWS // BATCH // world_size}
    with result.checkpoint.as_directory() as d:
        return set(os.listdir(d))


def test_the_accelerate_example_runs_in_local_mode_and_resumes(storage_path):
    files = _check(_fit(storage_path, num_workers=0), world_size=1)
    assert {"model.safetensors", "optimizer.bin", "epoch.json"} <= files, files


@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=2, nodes=1)
def test_the_accelerate_example_runs_on_two_ray_workers_and_resumes(storage_path):
    files = _check(_fit(storage_path, num_workers=2), world_size=2)
    # Both ranks' parts of the Accelerate state are in the one committed checkpoint.
    assert {"model.safetensors", "optimizer.bin", "epoch.json", "random_states_0.pkl",
            "random_states_1.pkl"} <= files, files


def test_the_accelerate_example_runs_from_the_command_line(tmp_path):
    assert _example().main(["--epochs", "2", "--name", "cli", "--storage-path", str(tmp_path)]) == 0
