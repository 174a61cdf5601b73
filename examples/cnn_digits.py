"""A small CNN on scikit-learn's 8x8 digits: the Ray docs' PyTorch getting-started loop on trainkit.

It is the FashionMNIST program of "Get Started with Distributed Training using PyTorch"
with ``ray.train`` replaced by ``trainkit`` and a dataset that ships with scikit-learn
(1,797 images, no download). The training function is unchanged between modes:

    python examples/cnn_digits.py                      # 2 workers (the ray backend)
    python examples/cnn_digits.py --num-workers 0      # local mode: this process, pdb works
    torchrun --nproc-per-node=2 examples/cnn_digits.py --num-workers 0   # 2 ranks under torchrun

Each epoch reports the loss and test accuracy with a checkpoint of the model; the
checkpoint of epoch e (report e+1) lands in ``<storage_path>/<name>/checkpoint_<e+1>/``.
Run again with the same ``--name`` and it resumes after the last committed epoch.
Needs ``pip install -e ".[examples]"`` (scikit-learn).
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
from trainkit import Checkpoint, RunConfig, ScalingConfig
from trainkit.torch import TorchTrainer


def load_digits_tensors(test_fraction: float = 0.2):
    """(train, test) TensorDatasets of 1x8x8 images scaled to [0, 1] and integer labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # same split on every rank
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def unwrap(model: nn.Module) -> nn.Module:
    # prepare_model wraps in DDP only when the world size is above 1 (as Ray Train does),
    # so `model.module` exists only then.
    return getattr(model, "module", model)


def train_func(config: dict):
    torch.manual_seed(config.get("seed", 0))
    ctx = trainkit.get_context()

    # Model, loss, optimizer. [1] prepare_model: device placement, DDP when world size > 1.
    model = trainkit.torch.prepare_model(build_model())
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])

    # Data. [2] prepare_data_loader: a DistributedSampler (keeps shuffle) and batches on the device.
    train_data, test_data = load_digits_tensors()
    train_loader = DataLoader(train_data, batch_size=config["batch_size"], shuffle=True)
    train_loader = trainkit.torch.prepare_data_loader(train_loader)
    test_loader = trainkit.torch.prepare_data_loader(DataLoader(test_data, batch_size=512),
                                                     add_dist_sampler=False)

    # Resume after the last committed epoch (a retried attempt, or a re-run with the same name).
    start_epoch = 0
    checkpoint = trainkit.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            unwrap(model).load_state_dict(torch.load(os.path.join(ckpt_dir, "model.pt")))
            start_epoch = checkpoint.get_metadata()["epoch"] + 1

    for epoch in range(start_epoch, config["epochs"]):
        if ctx.get_world_size() > 1:
            train_loader.sampler.set_epoch(epoch)

        model.train()
        for images, labels in train_loader:
            # This is done by `prepare_data_loader`:
            # images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images).argmax(dim=1) == labels).sum().item()
                total += len(labels)

        # [3] Report metrics and a checkpoint. Every rank calls report() (it is a barrier);
        # only rank 0 writes files, since the ranks' files are merged into one folder.
        metrics = {"loss": loss.item(), "accuracy": correct / total, "epoch": epoch}
        with tempfile.TemporaryDirectory() as temp_checkpoint_dir:
            ckpt = None
            if ctx.get_world_rank() == 0:
                torch.save(unwrap(model).state_dict(), os.path.join(temp_checkpoint_dir, "model.pt"))
                ckpt = Checkpoint.from_directory(temp_checkpoint_dir)
                ckpt.set_metadata({"epoch": epoch})
            trainkit.report(metrics, checkpoint=ckpt)
        if ctx.get_world_rank() == 0:
            print(f"[rank 0/{ctx.get_world_size()}] {metrics}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-workers", type=int, default=2,
                   help="ranks to start (0: local mode, in this process or one rank per torchrun process)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--name", default=None, help="run name (default: a unique one); reuse it to resume")
    p.add_argument("--storage-path", default=None,
                   help="where runs are stored (default $TRAINKIT_STORAGE_PATH or ~/trainkit_results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # [4] Scaling and [5] the trainer.
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size},
        scaling_config=ScalingConfig(num_workers=args.num_workers),
        run_config=RunConfig(name=args.name, storage_path=args.storage_path),
    )
    result = trainer.fit()

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process gets the Result
        return 0
    print(f"run folder: {result.path}")
    print(f"final metrics: {result.metrics}")

    # [6] Load the trained model from the last checkpoint.
    model = build_model()
    with result.checkpoint.as_directory() as checkpoint_dir:
        model.load_state_dict(torch.load(os.path.join(checkpoint_dir, "model.pt")))
    _, test_data = load_digits_tensors()
    with torch.no_grad():
        images, labels = test_data.tensors
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    print(f"restored model: test accuracy {accuracy:.3f} from {result.checkpoint.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
