"""Lightning and Transformers trainers in torchrun mode: a ``num_workers=0`` script launched by
``torchrun --nproc-per-node=2 --max-restarts=1`` on CPU (gloo). Each run crashes on its first
attempt; torchrun restarts the script, whose fit (same ``name``) resumes from the last report's
checkpoint. The run folder is read back with ``Result.from_path``. The models, data and crash
callbacks are framework_models.py's (test_lightning.py and test_transformers.py use them too); the
script finds that module through ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import pathlib
import textwrap

import pytest

from trainkit_testing.torchrun import launch_env, run_process_group, torchrun_command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HERE = pathlib.Path(__file__).resolve().parent

SCRIPT = textwrap.dedent('''
    import os, sys

    import framework_models as fm  # on PYTHONPATH (tests/integration); sets Hugging Face offline first
    from trainkit import RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer


    def lightning_func(config):
        import lightning.pytorch as pl
        from trainkit.lightning import (RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback,
                                        prepare_trainer)

        loader = fm.regression_loader(32, 8)
        crash = fm.LightningCrashOnce(config["folder"], 1, record=("step", "dist"))
        trainer = prepare_trainer(pl.Trainer(
            max_epochs=2, devices="auto", accelerator="auto", strategy=RayDDPStrategy(),
            plugins=[RayLightningEnvironment()], callbacks=[RayTrainReportCallback(), crash],
            enable_checkpointing=False, logger=False, enable_progress_bar=False, enable_model_summary=False))
        fm.fit_from_last_report(trainer, loader)


    def transformers_func(config):
        import transformers
        from trainkit.huggingface.transformers import RayTrainReportCallback, prepare_trainer

        model = fm.tiny_gpt2()
        args = transformers.TrainingArguments(
            output_dir=config["output_dir"], max_steps=4, per_device_train_batch_size=4, logging_steps=2,
            save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
        crash = fm.TransformersCrashOnce(config["folder"], 2, record=("step", "dist"))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=fm.TokenRows(32), callbacks=[crash])
        trainer.add_callback(RayTrainReportCallback())
        trainer = prepare_trainer(trainer)
        fm.train_from_last_report(trainer)


    def main():
        which, storage, folder = sys.argv[1:4]
        fn = {"lightning": lightning_func, "transformers": transformers_func}[which]
        config = {"folder": folder, "output_dir": os.path.join(folder, "hf_output")}
        TorchTrainer(fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name=which, storage_path=storage)).fit()


    if __name__ == "__main__":
        main()
''')


def _torchrun(tmp_path, which: str, timeout_s: float = 200):
    script = tmp_path / "framework_script.py"
    script.write_text(SCRIPT)
    storage, folder = tmp_path / "storage", tmp_path / "marks"
    folder.mkdir()
    # the script imports framework_models from this folder
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    cmd = torchrun_command(str(script), which, str(storage), str(folder), max_restarts=1)
    out = run_process_group(cmd, cwd=tmp_path, env=launch_env(PYTHONPATH=path), timeout_s=timeout_s)
    assert out.returncode == 0, out.stdout[-4000:]
    from trainkit import Result

    return Result.from_path(str(storage / which)), folder


def _start(folder, attempt, rank):
    with open(folder / f"start-a{attempt}-r{rank}.json") as f:
        return json.load(f)


def test_a_lightning_trainer_under_torchrun_resumes_after_torchrun_restarts_it(tmp_path):
    result, folder = _torchrun(tmp_path, "lightning")
    assert list(result.metrics_dataframe["epoch"]) == [0, 1]
    assert list(result.metrics_dataframe["step"]) == [2, 4]  # 32 rows, batch 8, half per rank
    for rank in (0, 1):
        assert _start(folder, 1, rank) == {"step": 0, "dist": 2}
        assert _start(folder, 2, rank) == {"step": 2, "dist": 2}
    with result.checkpoint.as_directory() as d:
        assert os.listdir(d) == ["checkpoint.ckpt"]


def test_a_transformers_trainer_under_torchrun_resumes_after_torchrun_restarts_it(tmp_path):
    result, folder = _torchrun(tmp_path, "transformers")
    assert list(result.metrics_dataframe["step"]) == [2, 4]
    assert isinstance(result.metrics["loss"], float)
    for rank in (0, 1):
        assert _start(folder, 2, rank) == {"step": 2, "dist": 2}
    with result.checkpoint.as_directory() as d:
        files = set(os.listdir(os.path.join(d, "checkpoint")))
    assert {"model.safetensors", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= files, files
