"""Hugging Face Accelerate in a trainkit training function, resumed after a crash.

The training loop is plain Accelerate (``Accelerator``, ``prepare``, ``backward``,
``save_state`` / ``load_state``); trainkit starts the ranks and their process group, and
Accelerate picks them up from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and the process group trainkit already made. Each epoch
every rank writes its part of the Accelerate state (model and optimizer from rank 0, each
rank's RNG state) into its own folder and reports it: trainkit merges the ranks' files
into one checkpoint. On the first attempt the loop crashes at ``--crash-at-epoch``;
``FailureConfig(max_failures=1)`` restarts it from the last checkpoint.

    python examples/hf_accelerate.py                   # local mode: one rank in this process
    python examples/hf_accelerate.py --num-workers 2   # 2 ranks on the ray backend

Generated data; nothing is downloaded. Needs ``pip install 'trainkit[transformers]'``
(which brings accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from torch.utils.data import DataLoader, TensorDataset

import trainkit
from trainkit import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from trainkit.torch import TorchTrainer


def train_func(config):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    start_epoch = 0
    checkpoint = trainkit.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            accelerator.load_state(d)
            with open(os.path.join(d, "epoch.json")) as f:
                start_epoch = json.load(f)["epoch"] + 1

    for epoch in range(start_epoch, config["epochs"]):
        if trainkit.get_context().get_attempt() == 1 and epoch == config.get("crash_at_epoch"):
            raise RuntimeError(f"a crash at the start of epoch {epoch}, on the first attempt only")
        batches = 0
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            batches += 1
        with tempfile.TemporaryDirectory() as d:
            accelerator.save_state(d)  # every rank: its RNG state; the main process: model and optimizer
            if accelerator.is_main_process:
                with open(os.path.join(d, "epoch.json"), "w") as f:
                    json.dump({"epoch": epoch}, f)
            trainkit.report({"epoch": epoch, "loss": loss.item(), "batches": batches,
                             "num_processes": accelerator.num_processes, "start_epoch": start_epoch},
                            checkpoint=Checkpoint.from_directory(d))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--crash-at-epoch", type=int, default=1)
    parser.add_argument("--name", default=None)
    parser.add_argument("--storage-path", default=None)
    args = parser.parse_args(argv)
    trainer = TorchTrainer(train_func, train_loop_config={"epochs": args.epochs, "crash_at_epoch": args.crash_at_epoch},
                           scaling_config=ScalingConfig(num_workers=args.num_workers),
                           run_config=RunConfig(name=args.name, storage_path=args.storage_path,
                                                failure_config=FailureConfig(max_failures=1)))
    result = trainer.fit()
    print("final metrics:", result.metrics)
    print("checkpoint:", result.checkpoint.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
