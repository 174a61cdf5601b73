"""FSDP in a trainkit training function: shard a model with FSDP2 (``fully_shard``) and checkpoint it.

Runs in the workers, after trainkit started the process group (Ray workers, torchrun ranks).
FSDP2 runs on CPU with gloo as well as on GPUs, so the same training function is tested on a
laptop and run on a cluster; FSDP1 (``FullyShardedDataParallel``) needs an accelerator in
torch 2.13. What ``prepare_model(parallel_strategy="fsdp" | "fsdp2")`` does on which device is
in ``wrap_for_strategy`` below and docs/frameworks.md.

Checkpoints: ``save_sharded_state(d, model, optimizer)`` has every rank write its own shards
(``torch.distributed.checkpoint``) into its own folder ``d``; passing ``d`` to
``trainkit.report(checkpoint=...)`` on every rank makes one committed checkpoint of all the
shards (trainkit merges the ranks' files), and ``load_sharded_state`` restores it, also at
another world size.

>>> model = fully_shard_model(build_model(), layer_classes=(Block,))  # doctest: +SKIP
>>> with tempfile.TemporaryDirectory() as d:  # doctest: +SKIP
...     save_sharded_state(d, model, optimizer)
...     trainkit.report(metrics, checkpoint=trainkit.Checkpoint.from_directory(d))
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

import torch

from trainkit.errors import ConfigError


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4/2.5 kept it under _composable
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]
    return fully_shard


def fully_shard_kwargs() -> list:
    """The keyword arguments ``torch.distributed.fsdp.fully_shard`` takes in this torch."""
    return [p for p in inspect.signature(_fully_shard()).parameters if p != "module"]


def fully_shard_model(model: torch.nn.Module, *, layer_classes: Optional[Iterable[type]] = None,
                      **fully_shard_options: Any) -> torch.nn.Module:
    """Shard ``model`` with FSDP2: each submodule of a type in ``layer_classes`` is its own unit
    (gathered only while it runs), then the root (the rest). Returns ``model``, now an
    ``FSDPModule`` whose parameters are ``DTensor`` shards of this rank.

    ``fully_shard_options`` go to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
    ``mp_policy``, ``offload_policy``, ...); the default mesh is all ranks on this rank's device type.
    Needs an initialised process group (trainkit starts one for Ray workers and torchrun ranks).

    >>> model = fully_shard_model(model, layer_classes=(torch.nn.TransformerEncoderLayer,))  # doctest: +SKIP
    """
    import torch.distributed as dist

    allowed = fully_shard_kwargs()
    unknown = sorted(set(fully_shard_options) - set(allowed))
    if unknown:
        raise ConfigError(f"FSDP2 option {unknown[0]!r}", fully_shard_options[unknown[0]],
                          f"one of fully_shard's keyword arguments {allowed} or layer_classes")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("fully_shard_model: no torch.distributed process group is initialised; FSDP2 needs one "
                          "(trainkit starts it on Ray workers and torchrun ranks; in local mode, num_workers=0, "
                          "there is no group: do not shard)")
    options = dict(fully_shard_options)
    if options.get("mesh") is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        options["mesh"] = init_device_mesh(device.type, (dist.get_world_size(),))
    fully_shard = _fully_shard()
    classes = tuple(layer_classes or ())
    if classes:
        for module in reversed(list(model.modules())):  # innermost first, the root last
            if module is not model and isinstance(module, classes):
                fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def wrap_for_strategy(model: torch.nn.Module, strategy: str, device: torch.device,
                      kwargs: Optional[dict]) -> torch.nn.Module:
    """``prepare_model``'s FSDP half (world size above 1).

    ``"fsdp"`` on a CUDA device: ``FullyShardedDataParallel(model, device_id=device, **kwargs)`` (FSDP1,
    Ray's behaviour and keyword arguments). ``"fsdp"`` on any other device, and ``"fsdp2"`` anywhere:
    ``fully_shard_model(model, **kwargs)``, as FSDP1 needs an accelerator (Ray refuses FSDP on CPU).
    """
    kwargs = dict(kwargs or {})
    if strategy == "fsdp" and device.type == "cuda":
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs.setdefault("device_id", device)
        return FullyShardedDataParallel(model, **kwargs)
    if strategy == "fsdp":
        fsdp1_only = sorted(set(kwargs) - set(fully_shard_kwargs()) - {"layer_classes"})
        if fsdp1_only:
            raise ConfigError(f"prepare_model(parallel_strategy_kwargs) key {fsdp1_only[0]!r}", kwargs[fsdp1_only[0]],
                              f"on {device.type}, one of FSDP2 fully_shard's {fully_shard_kwargs()} or layer_classes",
                              hint="FSDP1 (FullyShardedDataParallel) needs an accelerator; on CPU prepare_model shards "
                                   "with FSDP2, see docs/frameworks.md")
    return fully_shard_model(model, **kwargs)


def _state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded_state(directory: str, model: torch.nn.Module,
                       optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Write this rank's shards of ``model`` (and ``optimizer``) into ``directory`` with
    ``torch.distributed.checkpoint``. Call it on every rank (it is a collective), each with its
    own folder, then report that folder on every rank.

    >>> save_sharded_state(d, model, optimizer)  # doctest: +SKIP
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=directory)


def load_sharded_state(directory: str, model: torch.nn.Module,
                       optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Restore ``model`` (and ``optimizer``) from a folder written by ``save_sharded_state`` on
    every rank (a committed trainkit checkpoint holds every rank's files). Any world size.

    >>> with trainkit.get_checkpoint().as_directory() as d:  # doctest: +SKIP
    ...     load_sharded_state(d, model, optimizer)
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_model_state_dict(model: torch.nn.Module) -> dict:
    """The whole (unsharded) state dict of ``model`` on CPU, on rank 0 (an empty dict on the other
    ranks); a collective. For a portable ``model.pt`` that loads without FSDP.

    >>> sd = full_model_state_dict(model)  # doctest: +SKIP
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = ["fully_shard_model", "fully_shard_kwargs", "wrap_for_strategy", "save_sharded_state", "load_sharded_state",
           "full_model_state_dict"]
