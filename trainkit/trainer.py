"""``DataParallelTrainer``: validates a run before any worker starts, then hands it to a backend.

``num_workers=0`` always runs locally (in this process, torchrun-aware); otherwise the
backend is the ``backend=`` argument, else ``$TRAINKIT_BACKEND``, else ``ray``.
Runs in the driver.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from trainkit import _env
from trainkit.backends import TrainSpec, get_backend, handles_local_mode
from trainkit.config import RunConfig, ScalingConfig
from trainkit.errors import ConfigError


def _required_params(fn: Callable) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 0
    return sum(1 for p in sig.parameters.values()
               if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _takes_config(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    return bool(params) or has_var


def validate_train_fn(fn: Any) -> bool:
    """Check the function before any worker starts; returns whether it takes the config."""
    if not callable(fn):
        raise ConfigError("train_loop_per_worker", fn, "a callable taking 0 or 1 arguments")
    n = _required_params(fn)
    if n > 1:
        raise ConfigError("train_loop_per_worker", getattr(fn, "__name__", fn),
                          f"a function with 0 or 1 required arguments (it has {n})",
                          hint="take one `config` dict and pass values with train_loop_config")
    from trainkit._serialize import dumps_train_fn

    try:
        dumps_train_fn(fn)
    except Exception as e:  # noqa: BLE001 - any pickling failure is the same user error
        raise ConfigError("train_loop_per_worker", getattr(fn, "__name__", fn),
                          "a function that can be pickled to worker processes",
                          hint=f"{type(e).__name__}: {e}; do not capture locks, open files, sockets "
                               "or clients; create them inside the function") from None
    return _takes_config(fn)


class DataParallelTrainer:
    """Runs ``train_loop_per_worker`` on every rank.

    >>> trainer = DataParallelTrainer(train_fn, scaling_config=ScalingConfig(num_workers=2))  # doctest: +SKIP
    >>> result = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, train_loop_per_worker: Callable, *, train_loop_config: Optional[dict] = None,
                 scaling_config: Optional[ScalingConfig] = None, run_config: Optional[RunConfig] = None,
                 datasets: Optional[dict] = None, backend_config: Any = None, dataset_config: Any = None,
                 backend: Optional[str] = None, validation_config: Any = None,
                 resume_from_checkpoint: Any = None, metadata: Optional[dict] = None):
        from trainkit.errors import DeprecatedSettingError

        for key, value in (("resume_from_checkpoint", resume_from_checkpoint), ("metadata", metadata)):
            if value is not None:
                raise DeprecatedSettingError(key, "not supported (as in Ray Train V2): resume by re-running with "
                                             "the same RunConfig(name, storage_path)")
        self.takes_config = validate_train_fn(train_loop_per_worker)
        from trainkit.config import BackendConfig, ValidationConfig

        if validation_config is not None and not isinstance(validation_config, ValidationConfig):
            raise ConfigError("validation_config", validation_config, "None or a trainkit.ValidationConfig")
        if backend_config is not None and not isinstance(backend_config, BackendConfig):
            raise ConfigError("backend_config", backend_config, "None or a trainkit.BackendConfig (TorchConfig)")
        if validation_config is not None:
            from trainkit._serialize import dumps_train_fn

            try:
                dumps_train_fn(validation_config.fn)
            except Exception as e:  # noqa: BLE001 - shipped to rank 0 like the training function
                raise ConfigError("ValidationConfig.fn", getattr(validation_config.fn, "__name__", "..."),
                                  "a function that can be pickled to worker processes",
                                  hint=f"{type(e).__name__}: {e}") from None
        self.validation_config = validation_config
        if train_loop_config is not None and not isinstance(train_loop_config, dict):
            raise ConfigError("train_loop_config", type(train_loop_config).__name__, "a dict or None")
        scaling_config = scaling_config if scaling_config is not None else ScalingConfig()
        run_config = run_config if run_config is not None else RunConfig()
        if not isinstance(scaling_config, ScalingConfig):
            raise ConfigError("scaling_config", scaling_config, "a trainkit.ScalingConfig")
        if not isinstance(run_config, RunConfig):
            raise ConfigError("run_config", run_config, "a trainkit.RunConfig")
        if datasets is not None and not isinstance(datasets, dict):
            raise ConfigError("datasets", type(datasets).__name__, "a dict of name -> dataset")
        self.train_loop_per_worker = train_loop_per_worker
        self.train_loop_config = train_loop_config
        self.scaling_config = scaling_config
        self.run_config = run_config
        from trainkit.data.ingest import apply_data_config

        self.datasets = dict(datasets or {})
        self.backend_config = backend_config
        self.dataset_config = dataset_config
        # DataConfig: bad settings fail here; unsplit datasets and execution options travel with the datasets
        self._ingest_datasets = apply_data_config(self.datasets, dataset_config)
        self.backend_name = backend or _env.BACKEND.get()
        self._backend = get_backend(self.backend_name)  # unknown names fail here, before fit()
        if scaling_config.local_mode and not handles_local_mode(self._backend):
            self.backend_name, self._backend = "local", get_backend("local")  # trainkit's own local mode

    def _spec(self) -> TrainSpec:
        return TrainSpec(train_fn=self.train_loop_per_worker, train_loop_config=self.train_loop_config,
                         scaling_config=self.scaling_config, run_config=self.run_config,
                         torch_config=self.backend_config, datasets=self._ingest_datasets,
                         takes_config=self.takes_config, validation_config=self.validation_config)

    def fit(self):
        """Run training and return a ``Result``; raises ``TrainingFailedError`` if the run fails."""
        if self.run_config.logging_config is not None:  # the driver's logs (the ranks' and controller's: at start)
            self.run_config.logging_config.apply()
        return self._backend.run(self._spec())

    @classmethod
    def can_restore(cls, *args, **kwargs):
        raise ConfigError("Trainer.can_restore", "...", "not supported (as in Ray Train V2)",
                          hint="a run resumes when fit() runs again with the same RunConfig(name, storage_path)")

    @classmethod
    def restore(cls, *args, **kwargs):
        raise ConfigError("Trainer.restore", "...", "not supported (as in Ray Train V2)",
                          hint="re-run fit() with the same RunConfig(name, storage_path) to resume")
