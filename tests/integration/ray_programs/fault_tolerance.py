# The Ray Train V2 fault-tolerance pattern: resume from ray.train.get_checkpoint() inside the training
# function, FailureConfig(max_failures=...) in the RunConfig. Written in the `import ray` ...
# `ray.train.report` style. CRASH_ONCE names a file: the first attempt crashes after its epoch-1 report
# when the file does not exist yet (and creates it).
import json
import os
import tempfile

import torch

import ray
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def train_func(config):
    model = torch.nn.Linear(4, 1)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            state = torch.load(os.path.join(checkpoint_dir, "state.pt"))
            model.load_state_dict(state["model"])
            start_epoch = state["epoch"] + 1
    ctx = ray.train.get_context()
    for epoch in range(start_epoch, config["epochs"]):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ctx.get_world_rank() == 0:
                torch.save({"model": model.state_dict(), "epoch": epoch}, os.path.join(tmp, "state.pt"))
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report({"epoch": epoch, "start_epoch": start_epoch}, checkpoint=checkpoint)
        marker = config.get("crash_once")
        if marker and epoch == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("injected crash after epoch 1")


trainer = TorchTrainer(
    train_func,
    train_loop_config={"epochs": 4, "crash_once": os.environ.get("CRASH_ONCE")},
    scaling_config=ScalingConfig(num_workers=int(os.environ.get("NUM_WORKERS", "2"))),
    run_config=RunConfig(name="fault_tolerance", storage_path=os.environ.get("STORAGE"),
                         failure_config=FailureConfig(max_failures=1)),
)
result = trainer.fit()
if os.environ.get("OUT") and int(os.environ.get("RANK", "0")) == 0:
    with open(os.environ["OUT"], "w") as f:
        json.dump({"metrics": result.metrics, "error": repr(result.error) if result.error else None}, f)
