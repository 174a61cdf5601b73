"""Backends: what runs a training function under the trainkit API.

A backend is any object with ``name``, ``capabilities``, ``handles_local_mode``, ``needs_ray``
and ``run(spec) -> Result``; ``trainkit.backends.api`` is the public API for writing one.
Built-ins: ``local`` (in-process, torchrun-aware), ``ray`` (the reference: Ray actors +
torch.distributed) and ``ray_train`` (adapter to real Ray Train). Third parties register
more under the entry point group ``trainkit.backends``. Runs in the driver.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable

from trainkit.config import RunConfig, ScalingConfig
from trainkit.errors import ConfigError, MissingExtraError

# Capability names, used by the conformance suite and the chaos runner.
MULTI_WORKER = "multi_worker"
FAULT_INJECTION = "fault_injection"
ELASTIC = "elastic"
VIRTUAL_NODES = "virtual_nodes"
HANG_DIAGNOSTICS = "hang_diagnostics"
PREEMPTION = "preemption"
DURABLE_REPORT = "durable_report"


@dataclass
class TrainSpec:
    """Everything a backend needs to run one ``fit()``."""

    train_fn: Callable
    train_loop_config: Optional[dict]
    scaling_config: ScalingConfig
    run_config: RunConfig
    torch_config: Any = None
    datasets: dict = field(default_factory=dict)
    takes_config: bool = True
    # Resolved in the driver at fit() (TRAINKIT_WORKER_START_TIMEOUT_S), read by the controller actor.
    worker_start_timeout_s: float = 60.0
    report_channel: str = "tcp"  # TRAINKIT_REPORT_CHANNEL: rounds over a direct connection ("tcp") or actor calls ("ray")
    validation_config: Any = None  # the trainer's ValidationConfig: rank 0 validates reported checkpoints


@runtime_checkable
class Backend(Protocol):
    """What the trainer needs of a backend (trainkit.backends.api documents writing one)."""

    name: str
    capabilities: frozenset
    handles_local_mode: bool  # num_workers=0 runs on this backend (else trainkit's own local mode)
    needs_ray: bool  # run() needs a Ray cluster (the conformance suite starts one for it)

    def run(self, spec: TrainSpec): ...


def handles_local_mode(backend: Any) -> bool:
    return bool(getattr(backend, "handles_local_mode", False))


_BUILTIN = {
    "local": "trainkit.backends.local:LocalBackend",
    "ray": "trainkit.backends.ray:RayBackend",
    "ray_train": "trainkit.backends.ray_train:RayTrainBackend",
}


def _load(target: str):
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


_REGISTERED: dict[str, str] = {}  # register_backend(): backends known to this process only (test fixtures)


def register_backend(name: str, target: str) -> None:
    """Make ``target`` (``"module:attr"``) available as ``name`` in this process, without an entry point."""
    _REGISTERED[name] = target


def available_backends() -> dict[str, str]:
    found = dict(_BUILTIN)
    found.update(_REGISTERED)
    from importlib.metadata import entry_points

    for ep in entry_points(group="trainkit.backends"):
        found.setdefault(ep.name, ep.value)
    return found


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name``."""
    table = available_backends()
    if name not in table:
        raise ConfigError("backend", name, "one of " + ", ".join(sorted(table)))
    try:
        obj = _load(table[name])
    except (ImportError, AttributeError) as e:  # a broken third-party backend is named, not hidden
        if isinstance(e, MissingExtraError):
            raise
        raise ConfigError("backend", name, "a backend whose module can be imported",
                          hint=f"{table[name]} cannot be loaded: {type(e).__name__}: {e}") from e
    return obj() if isinstance(obj, type) else obj
