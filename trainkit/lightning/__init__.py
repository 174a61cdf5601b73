"""``trainkit.lightning``: run a PyTorch Lightning ``Trainer`` inside a trainkit training function.

The names and signatures of ``ray.train.lightning`` (Ray 2.60): ``RayDDPStrategy``,
``RayFSDPStrategy``, ``RayDeepSpeedStrategy`` (Lightning's strategies, told the rank's device
and place in the group by trainkit), ``RayLightningEnvironment`` (world size and ranks from
``trainkit.get_context()``), ``RayTrainReportCallback`` (one ``trainkit.report`` per training
epoch, with a checkpoint folder holding ``checkpoint.ckpt``) and ``prepare_trainer``.

Runs in the rank's process (the driver in local mode, each torchrun process, each Ray
worker). trainkit owns the process group where it made one (torchrun, Ray workers) and
Lightning reuses it; in local mode Lightning starts a one-rank group itself, and these
strategies destroy that group (and restore ``MASTER_ADDR``/``MASTER_PORT``) at teardown, so a
later fit in the same process starts clean. See docs/frameworks.md.

>>> trainer = pl.Trainer(max_epochs=2, devices="auto", accelerator="auto",
...                      strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
...                      callbacks=[RayTrainReportCallback()], enable_checkpointing=False)  # doctest: +SKIP
>>> trainer = prepare_trainer(trainer)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import torch

from trainkit.errors import ConfigError


def _import_lightning():
    try:
        import lightning.pytorch as pl
    except ModuleNotFoundError:
        try:
            import pytorch_lightning as pl
        except ModuleNotFoundError:
            from trainkit.extras import require

            require("lightning", "trainkit.lightning")  # raises MissingExtraError (an ImportError) with the pip command
            raise
    return pl


pl = _import_lightning()

try:
    from lightning.fabric.plugins.environments import LightningEnvironment
except ModuleNotFoundError:  # only the standalone pytorch_lightning package is installed
    from pytorch_lightning.plugins.environments import LightningEnvironment  # type: ignore[no-redef]


def _context():
    from trainkit.session import get_context

    return get_context()


class _TrainkitRanks:
    """What the three strategies share: the rank's device, the sampler's place, and the local-mode
    process group's cleanup. A mixin placed before the Lightning strategy in the bases."""

    _trainkit_made_group = False
    _trainkit_saved_env: Optional[dict] = None

    @property
    def root_device(self) -> torch.device:
        from trainkit.torch import get_device

        return get_device()

    @property
    def distributed_sampler_kwargs(self) -> Dict[str, Any]:
        return dict(num_replicas=self.world_size, rank=self.global_rank)

    def setup_environment(self) -> None:
        # Ray workers and torchrun ranks come with trainkit's process group, which Lightning reuses.
        # Without one (local mode) Lightning makes a one-rank group: remembered, to be undone at teardown.
        import torch.distributed as dist

        made = dist.is_available() and not dist.is_initialized()
        if made:
            self._trainkit_saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        super().setup_environment()
        self._trainkit_made_group = made and dist.is_initialized()

    def teardown(self) -> None:
        super().teardown()
        if self._trainkit_made_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            for k, v in (self._trainkit_saved_env or {}).items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._trainkit_made_group = False


class RayDDPStrategy(_TrainkitRanks, pl.strategies.DDPStrategy):
    """Lightning's ``DDPStrategy`` on trainkit's ranks: the rank's device and its place in the group.

    Takes every ``DDPStrategy`` argument. The process group's backend and timeout come from
    ``TorchConfig`` (trainkit starts the group), as in Ray.

    >>> pl.Trainer(strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()])  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


class RayFSDPStrategy(_TrainkitRanks, pl.strategies.FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on trainkit's ranks. Takes every ``FSDPStrategy`` argument
    (``state_dict_type="full"`` or ``"sharded"``, ``sharding_strategy``, ``auto_wrap_policy``, ...).

    >>> pl.Trainer(strategy=RayFSDPStrategy(state_dict_type="full"),
    ...            plugins=[RayLightningEnvironment()])  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


class RayDeepSpeedStrategy(_TrainkitRanks, pl.strategies.DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` on trainkit's ranks (needs ``deepspeed`` installed; see
    docs/frameworks.md for what is tested).

    >>> pl.Trainer(strategy=RayDeepSpeedStrategy(stage=2), plugins=[RayLightningEnvironment()])  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


class RayLightningEnvironment(LightningEnvironment):
    """Lightning's cluster environment answered by ``trainkit.get_context()``.

    The processes exist already (trainkit made them), so Lightning launches none; the
    world size and ranks cannot be set from Lightning's side.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    @property
    def creates_processes_externally(self) -> bool:
        return True

    def world_size(self) -> int:
        return _context().get_world_size()

    def global_rank(self) -> int:
        return _context().get_world_rank()

    def local_rank(self) -> int:
        return _context().get_local_rank()

    def node_rank(self) -> int:
        return _context().get_node_rank()

    def set_world_size(self, size: int) -> None:
        pass  # trainkit decides: world_size() reads the context

    def set_global_rank(self, rank: int) -> None:
        pass  # trainkit decides: global_rank() reads the context

    def teardown(self) -> None:
        pass  # LightningEnvironment would delete WORLD_SIZE, which belongs to the rank's process


_STRATEGIES = (RayDDPStrategy, RayFSDPStrategy, RayDeepSpeedStrategy)


def prepare_trainer(trainer: "pl.Trainer") -> "pl.Trainer":
    """Check that ``trainer`` runs on trainkit's ranks and return it.

    Its strategy must be a ``RayDDPStrategy``, ``RayFSDPStrategy`` or ``RayDeepSpeedStrategy``
    (or a subclass), and its cluster environment, if any, a ``RayLightningEnvironment``;
    anything else raises ``ConfigError`` (Ray raises ``RuntimeError``; see docs/frameworks.md).

    >>> trainer = prepare_trainer(pl.Trainer(strategy=RayDDPStrategy(),
    ...                                      plugins=[RayLightningEnvironment()]))  # doctest: +SKIP
    """
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, _STRATEGIES):
        raise ConfigError("pl.Trainer(strategy)", type(strategy).__name__,
                          "trainkit.lightning's RayDDPStrategy, RayFSDPStrategy or RayDeepSpeedStrategy "
                          "(or a subclass)",
                          hint="pass strategy=RayDDPStrategy() to pl.Trainer")
    env = getattr(strategy, "cluster_environment", None)
    if env is not None and not isinstance(env, RayLightningEnvironment):
        raise ConfigError("pl.Trainer(plugins) cluster environment", type(env).__name__,
                          "a trainkit.lightning.RayLightningEnvironment",
                          hint="pass plugins=[RayLightningEnvironment()] to pl.Trainer")
    return trainer


def _plain_metric(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class RayTrainReportCallback(pl.callbacks.Callback):
    """Report once per training epoch: ``trainer.callback_metrics`` (as numbers) plus ``epoch``
    and ``step`` (``trainer.global_step``), with a checkpoint folder holding ``checkpoint.ckpt``
    (``trainer.save_checkpoint``).

    Resume from it with ``trainer.fit(model, ckpt_path=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))``
    where ``d`` is ``trainkit.get_checkpoint()``'s folder.

    ``checkpoint_upload_mode`` (default ``SYNC``) and ``validation`` are passed on to ``trainkit.report``.

    >>> pl.Trainer(..., callbacks=[RayTrainReportCallback()], enable_checkpointing=False)  # doctest: +SKIP
    """

    CHECKPOINT_NAME = "checkpoint.ckpt"

    def __init__(self, checkpoint_upload_mode=None, validation=False) -> None:
        super().__init__()
        if checkpoint_upload_mode is None:  # as Ray Train V2: SYNC unless told otherwise
            from trainkit.config import CheckpointUploadMode

            checkpoint_upload_mode = CheckpointUploadMode.SYNC
        self.checkpoint_upload_mode = checkpoint_upload_mode
        self.validation = validation

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import trainkit

        metrics = {k: _plain_metric(v) for k, v in trainer.callback_metrics.items()}
        metrics["epoch"] = trainer.current_epoch
        metrics["step"] = trainer.global_step
        # Every rank saves (a sharded strategy writes its part; DDP writes on rank 0 only) and reports
        # its folder; trainkit merges the ranks' files into the one committed checkpoint.
        tmpdir = tempfile.mkdtemp(prefix=f"trainkit-lightning-rank{trainer.global_rank}-")
        keep = False
        try:
            trainer.save_checkpoint(os.path.join(tmpdir, self.CHECKPOINT_NAME), weights_only=False)
            # An ASYNC upload still reads the folder after report() returns; report() deletes it then.
            keep = self.checkpoint_upload_mode.default_delete_local_checkpoint_after_upload()
            trainkit.report(metrics, checkpoint=trainkit.Checkpoint.from_directory(tmpdir),
                            checkpoint_upload_mode=self.checkpoint_upload_mode, validation=self.validation)
            trainer.strategy.barrier()
        finally:
            if not keep:
                shutil.rmtree(tmpdir, ignore_errors=True)


__all__ = ["prepare_trainer", "RayDDPStrategy", "RayFSDPStrategy", "RayDeepSpeedStrategy", "RayLightningEnvironment",
           "RayTrainReportCallback"]
