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

from trainkit.checkpoint import Checkpoint
from trainkit.config import TorchConfig
from trainkit.errors import ConfigError, DeprecatedSettingError
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
                 datasets: Optional[dict] = None, dataset_config: Any = None, validation_config: Any = None,
                 metadata: Optional[dict] = None, resume_from_checkpoint: Any = None, backend: Optional[str] = None):
        torch_config = torch_config if torch_config is not None else TorchConfig()
        if not isinstance(torch_config, TorchConfig):
            raise ConfigError("torch_config", torch_config, "a trainkit.torch.TorchConfig")
        super().__init__(train_loop_per_worker, train_loop_config=train_loop_config,
                         scaling_config=scaling_config, run_config=run_config, datasets=datasets,
                         backend_config=torch_config, dataset_config=dataset_config, backend=backend,
                         validation_config=validation_config, metadata=metadata,
                         resume_from_checkpoint=resume_from_checkpoint)
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

    ``parallel_strategy="fsdp"`` shards it instead: FSDP1 on CUDA (as Ray), FSDP2 ``fully_shard``
    on CPU; ``"fsdp2"``: FSDP2 everywhere (``trainkit.torch.fsdp``, docs/frameworks.md).

    >>> model = prepare_model(torch.nn.Linear(4, 1))  # doctest: +SKIP
    """
    device = get_device()
    if isinstance(move_to_device, torch.device):
        device = move_to_device
    if move_to_device:
        model = model.to(device)
    if parallel_strategy not in ("ddp", "fsdp", "fsdp2", None):
        raise ConfigError("prepare_model(parallel_strategy)", parallel_strategy, "'ddp', 'fsdp', 'fsdp2' or None")
    if _world_size() > 1 and parallel_strategy in ("fsdp", "fsdp2"):
        from trainkit.torch.fsdp import wrap_for_strategy

        return wrap_for_strategy(model, parallel_strategy, device, parallel_strategy_kwargs)
    if _world_size() > 1 and parallel_strategy is not None:
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
    """Limit nondeterminism, as Ray's: seed torch, ``random`` and NumPy with ``seed``, turn on
    deterministic algorithms, turn off cuDNN benchmarking and set ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    (which deterministic CUDA matmuls need).

    >>> enable_reproducibility(seed=0)  # doctest: +SKIP
    """
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


_AMP_REMOVED = ("was removed in Ray Train V2 (Ray 2.60 raises DeprecationWarning too): use torch's own "
                "automatic mixed precision (torch.autocast and torch.amp.GradScaler) in the training function")


def accelerate(amp: bool = False) -> None:
    """Removed in Ray Train V2: raises, as Ray's does. Use ``torch.autocast`` instead."""
    raise DeprecatedSettingError("trainkit.torch.accelerate()", _AMP_REMOVED)


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Removed in Ray Train V2: raises, as Ray's does. Use the optimizer as it is."""
    raise DeprecatedSettingError("trainkit.torch.prepare_optimizer()", _AMP_REMOVED)


def backward(tensor: torch.Tensor) -> None:
    """Removed in Ray Train V2: raises, as Ray's does. Call ``tensor.backward()``."""
    raise DeprecatedSettingError("trainkit.torch.backward()", _AMP_REMOVED)


class TorchCheckpoint(Checkpoint):
    """A ``Checkpoint`` with helpers for a torch model (Ray's ``ray.train.torch.TorchCheckpoint``).

    ``from_state_dict`` / ``from_model`` write ``model.pt`` into a new temp folder;
    ``get_model`` loads it back.

    >>> ckpt = TorchCheckpoint.from_state_dict(torch.nn.Linear(2, 1).state_dict())  # doctest: +SKIP
    >>> model = ckpt.get_model(torch.nn.Linear(2, 1))  # doctest: +SKIP
    """

    MODEL_FILENAME = "model.pt"

    @classmethod
    def _write(cls, obj: Any, preprocessor: Any = None) -> "TorchCheckpoint":
        import tempfile

        if preprocessor is not None:
            raise ConfigError("TorchCheckpoint(preprocessor)", "...", "None (Ray Data preprocessors are not "
                              "stored in trainkit checkpoints)")
        d = tempfile.mkdtemp(prefix="trainkit_torch_ckpt_")
        torch.save(obj, os.path.join(d, cls.MODEL_FILENAME))
        return cls.from_directory(d)

    @classmethod
    def from_state_dict(cls, state_dict: dict, *, preprocessor: Any = None) -> "TorchCheckpoint":
        return cls._write(state_dict, preprocessor)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, preprocessor: Any = None) -> "TorchCheckpoint":
        return cls._write(model, preprocessor)

    def get_preprocessor(self) -> None:
        """Always None: trainkit checkpoints hold no Ray Data preprocessor."""
        return None

    def set_preprocessor(self, preprocessor: Any) -> None:
        raise ConfigError("TorchCheckpoint.set_preprocessor(preprocessor)", type(preprocessor).__name__,
                          "nothing: trainkit checkpoints hold no Ray Data preprocessor (save what you need as a file)")

    def get_model(self, model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
        """The model: ``model`` with the saved state dict loaded, or the saved module itself."""
        with self.as_directory() as d:
            saved = torch.load(os.path.join(d, self.MODEL_FILENAME), map_location="cpu",
                               weights_only=isinstance(model, torch.nn.Module))
        if isinstance(saved, torch.nn.Module):
            if model is not None:
                model.load_state_dict(saved.state_dict())
                return model
            return saved
        if model is None:
            raise ConfigError("TorchCheckpoint.get_model(model)", None,
                              "the model to load the saved state dict into")
        model.load_state_dict(saved)
        return model


__all__ = ["TorchTrainer", "TorchConfig", "TorchCheckpoint", "prepare_model", "prepare_data_loader", "get_device",
           "get_devices", "enable_reproducibility", "prepare_optimizer", "backward", "accelerate"]
