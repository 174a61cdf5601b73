"""``trainkit.huggingface.transformers``: a ``transformers.Trainer`` inside a trainkit training function.

The names and signatures of ``ray.train.huggingface.transformers`` (Ray 2.60):

* ``RayTrainReportCallback``: after each checkpoint the ``Trainer`` saves, one
  ``trainkit.report`` whose metrics are ``state.log_history`` merged in order (later keys win)
  and whose checkpoint folder holds that checkpoint as ``checkpoint/``.
* ``prepare_trainer``: lets the ``Trainer`` take this rank's dataset shard iterables
  (``trainkit.get_dataset_shard(name).iter_torch_batches(...)``) as ``train_dataset`` and
  ``eval_dataset``: their batches go to the model as they are (already this rank's rows,
  already batched and on the device), not through the ``Trainer``'s sampler and collator.

Runs in the rank's process. Where trainkit differs from Ray (which rank's files go into the
checkpoint, a barrier before copying them) is in docs/frameworks.md.

>>> trainer = transformers.Trainer(model=model, args=args, train_dataset=train)  # doctest: +SKIP
>>> trainer.add_callback(RayTrainReportCallback())  # doctest: +SKIP
>>> trainer = prepare_trainer(trainer)  # doctest: +SKIP
>>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset

if TYPE_CHECKING:
    from transformers import Trainer

try:  # the callback base and the checkpoint helpers only: transformers.trainer itself is much slower to import
    from transformers.trainer_callback import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
    _IMPORT_ERROR: Optional[ImportError] = None
except ImportError as e:  # the names stay importable; using them says what to install
    _IMPORT_ERROR = e
    TrainerCallback = object  # type: ignore[misc,assignment]


def _require_transformers() -> None:
    if _IMPORT_ERROR is not None:
        from trainkit.extras import require

        require("transformers", "trainkit.huggingface.transformers", ("transformers",))
        raise _IMPORT_ERROR  # installed but broken: its own error


def _merged_log_history(log_history: list) -> dict:
    metrics: dict = {}
    for entry in log_history:
        metrics.update(entry)
    return metrics


class RayTrainReportCallback(TrainerCallback):
    """Report to trainkit each time the ``Trainer`` saves a checkpoint (``on_save``).

    Metrics: the ``Trainer``'s ``state.log_history`` merged in order, so the latest value of
    each key (``loss``, ``eval_loss``, ``epoch``, ``step``...). Checkpoint: a folder holding
    the ``Trainer``'s checkpoint of this step as ``checkpoint/``. Resume with
    ``trainer.train(resume_from_checkpoint=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))``.

    Align ``logging_steps``/``eval_strategy`` with ``save_strategy`` so that the metrics of a
    report are those of its checkpoint.

    >>> trainer.add_callback(RayTrainReportCallback())  # doctest: +SKIP
    """

    CHECKPOINT_NAME = "checkpoint"

    def __init__(self, *args, **kwargs):
        _require_transformers()
        super().__init__(*args, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        import trainkit

        # The Trainer writes a checkpoint from several ranks (weights on rank 0, each rank its RNG
        # state) with no barrier before on_save: wait until every rank has written its part.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        metrics = _merged_log_history(state.log_history)
        source = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(source):
            source = get_last_checkpoint(args.output_dir)
        # One copy per node (its local rank 0): the ranks of a node share its output_dir, so the
        # others would only report the same files again.
        copy = source is not None and trainkit.get_context().get_local_rank() == 0
        with tempfile.TemporaryDirectory(prefix="trainkit-hf-") as tmpdir:
            checkpoint = None
            if copy:
                shutil.copytree(source, os.path.join(tmpdir, self.CHECKPOINT_NAME))
                checkpoint = trainkit.Checkpoint.from_directory(tmpdir)
            trainkit.report(metrics, checkpoint=checkpoint)


class RayTorchIterableDataset(IterableDataset):
    """A shard iterable seen by torch's ``DataLoader`` as an ``IterableDataset`` of ready batches."""

    def __init__(self, data_iterable) -> None:
        super().__init__()
        self.data_iterable = data_iterable

    def __iter__(self) -> Iterator:
        return iter(self.data_iterable)


def _first(batch: list) -> Any:
    return batch[0]


def _is_shard_iterable(obj: Any) -> bool:
    from trainkit.data import ShardIterable

    if isinstance(obj, ShardIterable):
        return True
    ray_iterator = sys.modules.get("ray.data.iterator")  # Ray's own (a user may hand one over)
    cls = getattr(ray_iterator, "_IterableFromIterator", None) if ray_iterator is not None else None
    return cls is not None and isinstance(obj, cls)


def _batches_loader(iterable) -> DataLoader:
    # batch_size=1 with a collate that unwraps: each item already is a whole batch.
    return DataLoader(RayTorchIterableDataset(iterable), batch_size=1, collate_fn=_first)


def prepare_trainer(trainer: Trainer) -> Trainer:
    """Let ``trainer`` take dataset shard iterables as ``train_dataset`` / ``eval_dataset``.

    Changes the trainer's class to a subclass whose ``get_train_dataloader`` and
    ``get_eval_dataloader`` feed such an iterable's batches as they are; any other dataset
    goes through the ``Trainer``'s own loaders. Set ``TrainingArguments(max_steps=...)``: an
    iterable has no length. Returns the same object.

    >>> train = trainkit.get_dataset_shard("train").iter_torch_batches(batch_size=8)  # doctest: +SKIP
    >>> trainer = prepare_trainer(transformers.Trainer(model, args, train_dataset=train))  # doctest: +SKIP
    """
    _require_transformers()
    base = trainer.__class__

    class RayTransformersTrainer(base):  # type: ignore[valid-type,misc]
        """``base`` with dataloaders that pass dataset shard iterables' batches through."""

        def get_train_dataloader(self) -> DataLoader:
            if _is_shard_iterable(self.train_dataset):
                return _batches_loader(self.train_dataset)
            return super().get_train_dataloader()

        def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
            if eval_dataset is None:
                eval_dataset = self.eval_dataset
            if isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict):
                named = self.eval_dataset.get(eval_dataset)
                if _is_shard_iterable(named):
                    return _batches_loader(named)
            elif _is_shard_iterable(eval_dataset):
                return _batches_loader(eval_dataset)
            return super().get_eval_dataloader(eval_dataset)

    trainer.__class__ = RayTransformersTrainer
    return trainer


__all__ = ["RayTrainReportCallback", "prepare_trainer"]
