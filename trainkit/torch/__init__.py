"""``trainkit.torch``: ``TorchTrainer`` and the helpers that make a model and a loader distributed.

Same names and behaviour as ``ray.train.torch``: ``prepare_model`` moves the model to
the rank's device and wraps it in DDP when the world size is above 1;
``prepare_data_loader`` adds a ``DistributedSampler`` (keeping ``shuffle``) and moves
batches to the device. Runs in workers (``TorchTrainer`` in the driver).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from trainkit.config import TorchConfig
from trainkit.errors import ConfigError
from trainkit.session import current_session, rank_device
from trainkit.trainer import DataParallelTrainer

class TorchTrainer(DataParallelTrainer):
    """A data-parallel PyTorch trainer.

    >>> trainer = TorchTrainer(train_func, train_loop_config={"lr": 1e-3},
    ...                        scaling_config=ScalingConfig(num_workers=2))  # doctest: +SKIP
    >>> result = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, train_loop_per_worker, *, train_loop_config: Optional[dict] = None,
                 torch_config: Optional[TorchConfig] = None, scaling_config=None, run_config=None,
                 datasets: Optional[dict] = None, dataset_config: Any = None, backend: Optional[str] = None,
                 **deprecated: Any):
        torch_config = torch_config if torch_config is not None else TorchConfig()
        if not isinstance(torch_config, TorchConfig):
            raise ConfigError("torch_config", torch_config, "a trainkit.torch.TorchConfig")
        super().__init__(train_loop_per_worker, train_loop_config=train_loop_config,
                         scaling_config=scaling_config, run_config=run_config, datasets=datasets,
                         backend_config=torch_config, dataset_config=dataset_config, backend=backend,
                         **deprecated)
        if torch_config.backend is None:
            chosen = "nccl" if self.scaling_config.use_gpu else "gloo"
            self.backend_config = TorchConfig(chosen, torch_config.timeout_s, torch_config.init_method)


def _world_size() -> int:
    return current_session("prepare_model").info.world_size


def get_device() -> torch.device:
    """This rank's device: its GPU (``cuda:<local index>``) when it has one, else CPU."""
    return rank_device(current_session("get_device").info)


def get_devices() -> list:
    return [get_device()]


def prepare_model(model: torch.nn.Module, move_to_device: bool | torch.device = True,
                  parallel_strategy: Optional[str] = "ddp", parallel_strategy_kwargs: Optional[dict] = None):
    """Move ``model`` to the rank's device and wrap it in DDP when the world size is above 1.

    >>> model = prepare_model(torch.nn.Linear(4, 1))  # doctest: +SKIP
    """
    device = get_device()
    if isinstance(move_to_device, torch.device):
        device = move_to_device
    if move_to_device:
        model = model.to(device)
    if _world_size() > 1 and parallel_strategy is not None:
        if parallel_strategy != "ddp":
            raise ConfigError("prepare_model(parallel_strategy)", parallel_strategy, "'ddp' or None")
        from torch.nn.parallel import DistributedDataParallel

        kwargs = dict(parallel_strategy_kwargs or {})
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device])
            kwargs.setdefault("output_device", device)
        model = DistributedDataParallel(model, **kwargs)
    return model


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_move(v, device) for v in batch]
        return type(batch)(moved) if isinstance(batch, tuple) and not hasattr(batch, "_fields") else (
            type(batch)(*moved) if hasattr(batch, "_fields") else moved)
    return batch


class _DeviceDataLoader(DataLoader):
    """A DataLoader that moves each batch to ``device``."""

    def __init__(self, *args, device: torch.device, **kwargs):
        super().__init__(*args, **kwargs)
        self._device = device

    def __iter__(self):
        for batch in super().__iter__():
            yield _move(batch, self._device)


_COPIED = ("batch_size", "num_workers", "collate_fn", "pin_memory", "drop_last", "timeout",
           "worker_init_fn", "generator", "multiprocessing_context", "persistent_workers")


def prepare_data_loader(data_loader: DataLoader, add_dist_sampler: bool = True, move_to_device: bool = True,
                        auto_transfer: bool = True) -> DataLoader:
    """Give each rank its part of the data and move batches to the rank's device.

    Adds a ``DistributedSampler`` (shuffling iff the loader shuffled) unless the loader
    already has one or iterates an ``IterableDataset``; call ``loader.sampler.set_epoch(e)``
    each epoch when shuffling.
    """
    world_size = _world_size()
    device = get_device()
    sampler = data_loader.sampler
    needs_sampler = (add_dist_sampler and world_size > 1 and not isinstance(sampler, DistributedSampler)
                     and not isinstance(data_loader.dataset, IterableDataset))
    custom_batch_sampler = data_loader.batch_size is None
    if not needs_sampler and not move_to_device:
        return data_loader
    kwargs = {k: getattr(data_loader, k) for k in _COPIED if hasattr(data_loader, k)}
    if kwargs.get("num_workers", 0) > 0:
        kwargs["prefetch_factor"] = data_loader.prefetch_factor
    else:
        kwargs.pop("persistent_workers", None)
        kwargs.pop("multiprocessing_context", None)
    if needs_sampler and not custom_batch_sampler:
        ctx = current_session("prepare_data_loader").info
        shuffle = isinstance(sampler, RandomSampler)
        kwargs["sampler"] = DistributedSampler(data_loader.dataset, num_replicas=world_size,
                                               rank=ctx.world_rank, shuffle=shuffle)
    elif custom_batch_sampler:
        for k in ("batch_size", "drop_last"):
            kwargs.pop(k, None)
        kwargs["batch_sampler"] = data_loader.batch_sampler
    else:
        kwargs["sampler"] = sampler
    if not move_to_device:
        return DataLoader(data_loader.dataset, **kwargs)
    return _DeviceDataLoader(data_loader.dataset, device=device, **kwargs)


def enable_reproducibility(seed: int = 0) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


__all__ = ["TorchTrainer", "TorchConfig", "prepare_model", "prepare_data_loader", "get_device", "get_devices",
           "enable_reproducibility"]
