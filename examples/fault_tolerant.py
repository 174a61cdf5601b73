"""A fault-tolerant training loop: resume from ``get_checkpoint()`` after a crash.

The loop of the Ray Train workloads tutorial ("Fault tolerance in Ray Train") on
trainkit, with generated data (no download). It saves the model, the optimizer and the
epoch in every checkpoint and, on the first attempt only, crashes at ``--crash-at-epoch``.
``FailureConfig(max_failures=...)`` restarts it from the latest committed checkpoint, so
each epoch is reported once in the run's final history:

    python examples/fault_tolerant.py                    # local mode: re-run in this process
    python examples/fault_tolerant.py --num-workers 2    # 2 ranks on the ray backend
    python examples/fault_tolerant.py --max-failures 0 --name ft-demo   # fit() raises ...
    python examples/fault_tolerant.py --max-failures 0 --name ft-demo   # ... and this resumes it

``trainkit.get_context().get_attempt()`` is 1 on the first attempt of a run and counts
on across restarts and across ``fit()`` calls with the same ``name``, so the crash
happens once per run folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainkit
import trainkit.torch
from trainkit import Checkpoint, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from trainkit.torch import TorchTrainer


def make_data(n: int = 1024, features: int = 16) -> TensorDataset:
    """y = x @ w + noise, the same on every rank and every attempt."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, 1, generator=g))


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP only when the world size is above 1


def save_checkpoint_and_report(model, optimizer, epoch: int, metrics: dict) -> None:
    """Rank 0 saves model + optimizer + epoch; every rank calls report() to stay in step."""
    with tempfile.TemporaryDirectory() as temp_checkpoint_dir:
        checkpoint = None
        if trainkit.get_context().get_world_rank() == 0:
            torch.save(unwrap(model).state_dict(), os.path.join(temp_checkpoint_dir, "model.pt"))
            torch.save(optimizer.state_dict(), os.path.join(temp_checkpoint_dir, "optimizer.pt"))
            torch.save({"epoch": epoch}, os.path.join(temp_checkpoint_dir, "extra_state.pt"))
            checkpoint = Checkpoint.from_directory(temp_checkpoint_dir)
        trainkit.report(metrics, checkpoint=checkpoint)


def train_func(config: dict):
    torch.manual_seed(0)
    ctx = trainkit.get_context()
    model = trainkit.torch.prepare_model(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    criterion = nn.MSELoss()
    loader = trainkit.torch.prepare_data_loader(DataLoader(make_data(), batch_size=64, shuffle=True))

    # Default: start at epoch 0 unless a checkpoint is available.
    start_epoch = 0
    checkpoint = trainkit.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            unwrap(model).load_state_dict(torch.load(os.path.join(ckpt_dir, "model.pt")))
            optimizer.load_state_dict(torch.load(os.path.join(ckpt_dir, "optimizer.pt")))
            start_epoch = torch.load(os.path.join(ckpt_dir, "extra_state.pt"))["epoch"] + 1
    if ctx.get_world_rank() == 0:
        print(f"attempt {ctx.get_attempt()}: starting at epoch {start_epoch}", flush=True)

    for epoch in range(start_epoch, config["num_epochs"]):
        if ctx.get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        # The injected failure: on the first attempt only, rank 0 dies mid-run.
        if epoch == config["crash_at_epoch"] and ctx.get_attempt() == 1 and ctx.get_world_rank() == 0:
            raise RuntimeError(f"simulated crash at epoch {epoch} (attempt {ctx.get_attempt()})")

        save_checkpoint_and_report(model, optimizer, epoch,
                                   {"epoch": epoch, "loss": loss.item(), "attempt": ctx.get_attempt()})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-workers", type=int, default=0, help="0: local mode (default); >= 1: ray backend")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--crash-at-epoch", type=int, default=3, help="epoch at which attempt 1 crashes (-1: never)")
    p.add_argument("--max-failures", type=int, default=3, help="FailureConfig.max_failures (-1: unlimited)")
    p.add_argument("--name", default=None, help="run name (default: a unique one); reuse it to resume")
    p.add_argument("--storage-path", default=None,
                   help="where runs are stored (default $TRAINKIT_STORAGE_PATH or ~/trainkit_results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"num_epochs": args.epochs, "crash_at_epoch": args.crash_at_epoch},
        scaling_config=ScalingConfig(num_workers=args.num_workers),
        run_config=RunConfig(
            name=args.name,
            storage_path=args.storage_path,
            failure_config=FailureConfig(max_failures=args.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        # Retries exhausted. The committed checkpoints are kept: re-run with the same name.
        print(f"fit() raised {type(e).__name__}: {e.message}")
        print(f"re-run with --name {trainer.run_config.name} to resume from the last committed epoch")
        return 1

    print(f"run folder: {result.path}")
    print(result.metrics_dataframe.to_string(index=False))
    epochs = list(result.metrics_dataframe["epoch"])
    assert epochs == list(range(args.epochs)), f"each epoch once, in order: {epochs}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
