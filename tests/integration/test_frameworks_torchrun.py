"""Lightning and Transformers trainers in torchrun mode: a ``num_workers=0`` script launched by
``torchrun --nproc-per-node=2 --max-restarts=1`` on CPU (gloo). Each run crashes on its first
attempt; torchrun restarts the script, whose fit (same ``name``) resumes from the last report's
checkpoint. The run folder is read back with ``Result.from_path``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SCRIPT = textwrap.dedent('''
    import json, os, sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import trainkit
    from trainkit import RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer


    def mark(folder, **fields):
        ctx = trainkit.get_context()
        with open(os.path.join(folder, f"start-a{ctx.get_attempt()}-r{ctx.get_world_rank()}.json"), "w") as f:
            json.dump(fields, f)


    def lightning_func(config):
        import lightning.pytorch as pl
        from trainkit.lightning import (RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback,
                                        prepare_trainer)

        class Tiny(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = torch.nn.functional.mse_loss(self.net(x), y)
                self.log("train_loss", loss)
                return loss

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        class Crash(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                mark(config["folder"], step=trainer.global_step, dist=torch.distributed.get_world_size())

            def on_train_epoch_start(self, trainer, pl_module):
                if trainkit.get_context().get_attempt() == 1 and trainer.current_epoch == 1:
                    raise RuntimeError("crash at the start of epoch 1")

        torch.manual_seed(0)
        x = torch.randn(32, 4)
        loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
        trainer = prepare_trainer(pl.Trainer(
            max_epochs=2, devices="auto", accelerator="auto", strategy=RayDDPStrategy(),
            plugins=[RayLightningEnvironment()], callbacks=[RayTrainReportCallback(), Crash()],
            enable_checkpointing=False, logger=False, enable_progress_bar=False, enable_model_summary=False))
        checkpoint = trainkit.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                trainer.fit(Tiny(), train_dataloaders=loader,
                            ckpt_path=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
        else:
            trainer.fit(Tiny(), train_dataloaders=loader)


    def transformers_func(config):
        import transformers
        from trainkit.huggingface.transformers import RayTrainReportCallback, prepare_trainer

        class Rows(torch.utils.data.Dataset):
            def __init__(self):
                self.ids = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(0))

            def __len__(self):
                return len(self.ids)

            def __getitem__(self, i):
                return {"input_ids": self.ids[i], "labels": self.ids[i]}

        class Crash(transformers.TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                mark(config["folder"], step=state.global_step, dist=torch.distributed.get_world_size())

            def on_step_begin(self, args, state, control, **kwargs):
                if trainkit.get_context().get_attempt() == 1 and state.global_step == 2:
                    raise RuntimeError("crash after step 2")

        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16,
                                                                     n_layer=1, n_head=2))
        args = transformers.TrainingArguments(
            output_dir=config["output_dir"], max_steps=4, per_device_train_batch_size=4, logging_steps=2,
            save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Crash()])
        trainer.add_callback(RayTrainReportCallback())
        trainer = prepare_trainer(trainer)
        checkpoint = trainkit.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                trainer.train(resume_from_checkpoint=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
        else:
            trainer.train()


    def main():
        which, storage, folder = sys.argv[1:4]
        fn = {"lightning": lightning_func, "transformers": transformers_func}[which]
        config = {"folder": folder, "output_dir": os.path.join(folder, "hf_output")}
        TorchTrainer(fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name=which, storage_path=storage)).fit()


    if __name__ == "__main__":
        main()
''')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, which: str, timeout_s: float = 200):
    script = tmp_path / "framework_script.py"
    script.write_text(SCRIPT)
    storage, folder = tmp_path / "storage", tmp_path / "marks"
    folder.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), which, str(storage), str(folder)]
    # Own process group, so a timeout kills the ranks too, not only the torchrun launcher.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                          start_new_session=True) as popen:
        try:
            out, _ = popen.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    assert popen.returncode == 0, out[-4000:]
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
