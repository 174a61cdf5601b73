# The Ray Train V2 PyTorch getting-started program (its structure and its ray.train calls), on a
# tiny CNN and generated 8x8 images instead of ResNet-18 and FashionMNIST (no downloads).
import json
import os
import tempfile

import torch
from torch.nn import CrossEntropyLoss
from torch.optim import Adam
from torch.utils.data import DataLoader, TensorDataset

import ray.train.torch


def make_data(n=256):
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 1, 8, 8, generator=g)
    labels = torch.arange(n) % 10
    return TensorDataset(templates[labels] + 0.3 * torch.randn(n, 1, 8, 8, generator=g), labels)


def train_func():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    # [1] Prepare model.
    model = ray.train.torch.prepare_model(model)
    criterion = CrossEntropyLoss()
    optimizer = Adam(model.parameters(), lr=0.01)

    # [2] Prepare dataloader.
    train_loader = DataLoader(make_data(), batch_size=32, shuffle=True)
    train_loader = ray.train.torch.prepare_data_loader(train_loader)

    for epoch in range(2):
        if ray.train.get_context().get_world_size() > 1:
            train_loader.sampler.set_epoch(epoch)
        for images, labels in train_loader:
            outputs = model(images)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        # [3] Report metrics and checkpoint.
        metrics = {"loss": loss.item(), "epoch": epoch}
        with tempfile.TemporaryDirectory() as temp_checkpoint_dir:
            state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
            torch.save(state, os.path.join(temp_checkpoint_dir, "model.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(temp_checkpoint_dir))
        if ray.train.get_context().get_world_rank() == 0:
            print(metrics)


# [4] Configure scaling and resource requirements.
scaling_config = ray.train.ScalingConfig(num_workers=int(os.environ.get("NUM_WORKERS", "2")), use_gpu=False)

# [5] Launch distributed training job.
trainer = ray.train.torch.TorchTrainer(
    train_func,
    scaling_config=scaling_config,
    run_config=ray.train.RunConfig(name="getting_started", storage_path=os.environ.get("STORAGE")),
)
result = trainer.fit()

# [6] Load the trained model.
with result.checkpoint.as_directory() as checkpoint_dir:
    model_state_dict = torch.load(os.path.join(checkpoint_dir, "model.pt"))
if os.environ.get("OUT") and int(os.environ.get("RANK", "0")) == 0:
    with open(os.environ["OUT"], "w") as f:
        json.dump({"metrics": result.metrics, "keys": sorted(model_state_dict), "path": result.path}, f)
