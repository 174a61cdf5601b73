"""trainkit.huggingface.transformers: a ``transformers.Trainer`` in a trainkit training function.

A tiny GPT-2 built from a config (no downloads, Hugging Face offline) on generated tokens (the model,
the data and the crash callback are framework_models.py's, shared with test_frameworks_torchrun.py), in
local mode (a map-style dataset) and on 2 Ray workers (Ray Data shards as the train and eval
datasets through ``prepare_trainer``). Each run crashes once and must resume from the
``checkpoint/`` folder of its last report at that report's step.
"""

from __future__ import annotations

import json
import os

import pytest

# Hugging Face offline: framework_models sets it before transformers is imported.
from framework_models import TokenRows, TransformersCrashOnce, tiny_gpt2, tokens, train_from_last_report

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import trainkit  # noqa: E402
from trainkit import FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from trainkit.huggingface.transformers import RayTrainReportCallback, prepare_trainer  # noqa: E402
from trainkit.torch import TorchTrainer  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROWS = 32
SAVE_STEPS, MAX_STEPS, CRASH_AFTER = 2, 6, 4


def to_model_inputs(batch):
    """The numpy batch of a shard as the model's keyword arguments (the ``id`` column left out)."""
    return {k: torch.as_tensor(batch[k]) for k in ("input_ids", "labels")}


def train_func(config):
    model = tiny_gpt2()
    ray_data = config["ray_data"]
    if ray_data:  # this rank's Ray Data shards, as ready batches
        train = trainkit.get_dataset_shard("train").iter_torch_batches(batch_size=4, collate_fn=to_model_inputs)
        evaluation = trainkit.get_dataset_shard("eval").iter_torch_batches(batch_size=4, collate_fn=to_model_inputs)
    else:
        train, evaluation = TokenRows(ROWS), TokenRows(8)
    args = transformers.TrainingArguments(
        output_dir=config["output_dir"], max_steps=MAX_STEPS, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-3, logging_steps=SAVE_STEPS, save_strategy="steps",
        save_steps=SAVE_STEPS, eval_strategy="steps", eval_steps=SAVE_STEPS, report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                   callbacks=[TransformersCrashOnce(config["folder"], CRASH_AFTER)])
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    train_from_last_report(trainer)


def _fit(tmp_path, storage_path, num_workers, datasets=None):
    folder = tmp_path / "marks"
    folder.mkdir()
    config = {"folder": str(folder), "output_dir": str(tmp_path / "hf_output"), "ray_data": datasets is not None}
    trainer = TorchTrainer(train_func, train_loop_config=config, scaling_config=ScalingConfig(num_workers=num_workers),
                           run_config=RunConfig(name="hf", storage_path=storage_path,
                                                failure_config=FailureConfig(max_failures=1)),
                           datasets=datasets)
    return trainer.fit(), folder


def _check_resumed_run(result, folder):
    assert result.error is None
    m = result.metrics
    # log_history merged: the train log's loss and the eval log's eval_loss in one report.
    assert m["step"] == MAX_STEPS and isinstance(m["loss"], float) and isinstance(m["eval_loss"], float)
    assert list(result.metrics_dataframe["step"]) == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    with open(folder / "start-a2-r0.json") as f:
        assert json.load(f) == {"step": CRASH_AFTER}
    with result.checkpoint.as_directory() as d:
        assert os.listdir(d) == ["checkpoint"]
        files = set(os.listdir(os.path.join(d, "checkpoint")))
        with open(os.path.join(d, "checkpoint", "trainer_state.json")) as f:
            state = json.load(f)
    assert {"model.safetensors", "config.json", "trainer_state.json", "optimizer.pt"} <= files, files
    assert state["global_step"] == MAX_STEPS
    return files


def test_a_transformers_trainer_in_local_mode_reports_each_save_and_resumes_after_a_crash(tmp_path, storage_path):
    result, folder = _fit(tmp_path, storage_path, num_workers=0)
    files = _check_resumed_run(result, folder)
    assert "rng_state.pth" in files


@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=2, nodes=1)
def test_a_transformers_trainer_on_two_ray_workers_reads_ray_data_shards_and_resumes(tmp_path, storage_path):
    import ray

    ids = tokens(ROWS).numpy()
    train = ray.data.from_items([{"id": i, "input_ids": ids[i], "labels": ids[i]} for i in range(ROWS)])
    evaluation = ray.data.from_items([{"id": i, "input_ids": ids[i], "labels": ids[i]} for i in range(8)])
    result, folder = _fit(tmp_path, storage_path, num_workers=2, datasets={"train": train, "eval": evaluation})
    files = _check_resumed_run(result, folder)
    # Every rank's RNG state is in the one committed checkpoint (written by both ranks, copied once).
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= files, files
    with open(folder / "start-a2-r1.json") as f:
        assert json.load(f) == {"step": CRASH_AFTER}
