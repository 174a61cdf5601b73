"""Built-in training functions for chaos scenarios, tests and benchmarks. Run in every rank.

``counter`` is cheap: it counts steps, reports each one and checkpoints its step, so
it resumes exactly and shows any lost or repeated report. ``digits`` trains a small CNN
on scikit-learn's 8x8 digits (generated data when scikit-learn is missing), and is
deterministic: the same config and world size give bit-identical weights whether or not
the run was interrupted, because the model, the optimizer and the step are in every
checkpoint and each batch is a pure function of (seed, epoch, step, rank, world size).

    {"entry": "trainkit.workloads:counter", "config": {"steps": 10, "checkpoint_every": 1, "step_s": 0}}
    {"entry": "trainkit.workloads:digits", "config": {"epochs": 2, "batch_size": 64}}

Both report ``step`` (= the report index) and ``world_size``; rank 0 writes the checkpoint.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
import time

import trainkit
from trainkit.errors import ConfigError

COUNTER_DEFAULTS = {"steps": 10, "checkpoint_every": 1, "step_s": 0.0}
DIGITS_DEFAULTS = {"epochs": 2, "batch_size": 64, "lr": 0.05, "seed": 0, "step_s": 0.0}


def _settings(name: str, config: dict, defaults: dict) -> dict:
    config = dict(config or {})
    for k in config:
        if k not in defaults:
            near = difflib.get_close_matches(k, list(defaults), n=1)
            raise ConfigError(f"{name} workload config key {k!r}", config[k], "one of " + ", ".join(defaults),
                              hint=f"did you mean {near[0]!r}?" if near else "")
    out = dict(defaults, **config)
    for k, v in out.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{name} workload config {k!r}", v, "a number >= 0")
    return out


def counter(config: dict):
    """Report ``steps`` times; checkpoint every ``checkpoint_every`` steps (and when preempted)."""
    cfg = _settings("counter", config, COUNTER_DEFAULTS)
    ctx = trainkit.get_context()
    ckpt = trainkit.get_checkpoint()
    step = 0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "counter.json")) as f:
                step = json.load(f)["step"]
    every = max(int(cfg["checkpoint_every"]), 1)
    while step < cfg["steps"]:
        step += 1
        if cfg["step_s"]:
            time.sleep(cfg["step_s"])
        metrics = {"step": step, "world_size": ctx.get_world_size(), "attempt": ctx.get_attempt()}
        save = step % every == 0 or step == cfg["steps"] or ctx.is_preempted()
        def write(d: str, step=step) -> None:
            with open(os.path.join(d, "counter.json"), "w") as f:
                json.dump({"step": step}, f)

        _report(metrics, write if save and ctx.get_world_rank() == 0 else None)
    return step


def _report(metrics: dict, write=None) -> None:
    """``report(metrics)``, with a checkpoint folder filled by ``write(folder)`` when given."""
    if write is None:
        trainkit.report(metrics)
        return
    d = tempfile.mkdtemp(prefix="trainkit_workload_")
    try:
        write(d)
        trainkit.report(metrics, checkpoint=trainkit.Checkpoint.from_directory(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


counter.config_keys = tuple(COUNTER_DEFAULTS)


def _digits_data(seed: int):
    import torch

    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
    except ImportError:  # generated digits-like data: 10 noisy prototypes
        g = torch.Generator().manual_seed(seed)
        protos = torch.rand(10, 1, 8, 8, generator=g)
        y = torch.arange(1797) % 10
        x = (protos[y] + 0.3 * torch.rand(1797, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def _digits_model():
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 8, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


def digits(config: dict):
    """A deterministic small CNN; one report (with a checkpoint) per batch."""
    import torch
    import torch.distributed as dist
    from torch import nn

    cfg = _settings("digits", config, DIGITS_DEFAULTS)
    torch.set_num_threads(1)  # one thread: bit-reproducible CPU kernels, and 2 cores shared by ranks
    ctx = trainkit.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = _digits_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    step = 0
    ckpt = trainkit.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "digits.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    x, y = _digits_data(seed)
    per_rank = len(y) // world_size
    batch = max(int(cfg["batch_size"]), 1)
    steps_per_epoch = -(-per_rank // batch)
    total = int(cfg["epochs"]) * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    while step < total:
        epoch, b = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        mine = perm[rank:per_rank * world_size:world_size][b * batch:(b + 1) * batch]
        optimizer.zero_grad()
        loss = loss_fn(model(x[mine]), y[mine])
        loss.backward()
        if world_size > 1 and dist.is_initialized():  # average gradients: one fixed-order all_reduce
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world_size
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
        optimizer.step()
        step += 1
        if cfg["step_s"]:
            time.sleep(cfg["step_s"])
        metrics = {"step": step, "epoch": epoch, "loss": float(loss.item()), "world_size": world_size}
        def write(d: str, step=step) -> None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                       os.path.join(d, "digits.pt"))

        _report(metrics, write if rank == 0 else None)
    return step


digits.config_keys = tuple(DIGITS_DEFAULTS)


def load_digits_weights(checkpoint) -> dict:
    """The model weights (name -> tensor) of a ``digits`` checkpoint."""
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "digits.pt"), weights_only=True)["model"]
