"""The tiny models, data and crash-once callbacks of the Lightning and Transformers tests, in one place.

Used by test_lightning.py, test_transformers.py and the torchrun script of
test_frameworks_torchrun.py (which runs with this folder on its ``PYTHONPATH``). Not a test
module (pytest collects ``test_*.py`` only). Runs in the pytest process, in the ranks the
tests start (Ray workers, torchrun's processes) and in local mode in the test process.

* Lightning: ``TinyRegressor`` (a 2-layer MLP, 4 -> 8 -> 1) on ``regression_loader`` rows
  (4 random features, their sum as the target); ``LightningCrashOnce`` marks where each
  attempt starts and raises at the start of one epoch in attempt 1; ``fit_from_last_report``
  fits from the last reported checkpoint (``checkpoint.ckpt``) when there is one.
* Transformers: ``tiny_gpt2()`` (built from a config: no downloads), ``TokenRows`` (seeded
  random tokens, labels = input ids); ``TransformersCrashOnce`` as above, after a step;
  ``train_from_last_report`` resumes from the last reported ``checkpoint/`` folder.

Each crash callback writes ``start-a<attempt>-r<world rank>.json`` into a folder at the start of
training, holding the fields named by ``record`` (``epoch``, ``step``, ``dist``: the world size of
the process group). Ray workers cannot import this module (this folder is not on their path),
so it is pickled by value with the training functions that use it, as a test module is.
Lightning or Transformers missing: the tests that need it skip themselves; this module still imports.
"""

from __future__ import annotations

import json
import os
import sys

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # before transformers is imported: it reads them then

import cloudpickle  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import trainkit  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:  # test_lightning.py skips itself
    pl = None
try:
    import transformers
except ImportError:  # test_transformers.py skips itself
    transformers = None

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SEQ, VOCAB = 8, 32  # the GPT-2's context length and vocabulary


def mark(folder: str, **fields) -> None:
    """Write ``fields`` to ``start-a<attempt>-r<world rank>.json`` in ``folder``."""
    ctx = trainkit.get_context()
    with open(os.path.join(folder, f"start-a{ctx.get_attempt()}-r{ctx.get_world_rank()}.json"), "w") as f:
        json.dump(fields, f)


# -- Lightning --------------------------------------------------------------------------------------------------
class TinyRegressor(pl.LightningModule if pl else object):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class LightningCrashOnce(pl.Callback if pl else object):
    """Records where each attempt starts (``record``: of ``epoch``, ``step``, ``dist``); raises at the
    start of epoch ``crash_at`` in attempt 1 (``None``: never)."""

    def __init__(self, folder, crash_at, record=("epoch", "step")):
        self.folder, self.crash_at, self.record = folder, crash_at, record

    def on_train_start(self, trainer, pl_module):
        values = {"epoch": lambda: trainer.current_epoch, "step": lambda: trainer.global_step,
                  "dist": torch.distributed.get_world_size}
        mark(self.folder, **{k: values[k]() for k in self.record})

    def on_train_epoch_start(self, trainer, pl_module):
        if trainkit.get_context().get_attempt() == 1 and trainer.current_epoch == self.crash_at:
            raise RuntimeError(f"crash at the start of epoch {self.crash_at}")


def regression_loader(rows: int, batch_size: int, shuffle: bool = False) -> DataLoader:
    """``rows`` rows of 4 features (seed 0) and their sum."""
    torch.manual_seed(0)
    x = torch.randn(rows, 4)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=batch_size, shuffle=shuffle)


def fit_from_last_report(trainer, loader) -> None:
    """``trainer.fit`` a new ``TinyRegressor`` on ``loader``, from the last reported checkpoint when there is one."""
    from trainkit.lightning import RayTrainReportCallback

    checkpoint = trainkit.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.fit(TinyRegressor(), train_dataloaders=loader,
                        ckpt_path=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        trainer.fit(TinyRegressor(), train_dataloaders=loader)


# -- Transformers -----------------------------------------------------------------------------------------------
def tokens(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``SEQ`` random token ids below ``VOCAB``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = tokens(n)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    """A one-layer GPT-2 over ``VOCAB`` tokens and ``SEQ`` positions, seeded (``torch.manual_seed(0)``)."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2))


class TransformersCrashOnce(transformers.TrainerCallback if transformers else object):
    """Records the step each attempt starts at (``record``: of ``step``, ``dist``); raises after step
    ``crash_after`` in attempt 1."""

    def __init__(self, folder, crash_after, record=("step",)):
        self.folder, self.crash_after, self.record = folder, crash_after, record

    def on_train_begin(self, args, state, control, **kwargs):
        values = {"step": lambda: state.global_step, "dist": torch.distributed.get_world_size}
        mark(self.folder, **{k: values[k]() for k in self.record})

    def on_step_begin(self, args, state, control, **kwargs):
        if trainkit.get_context().get_attempt() == 1 and state.global_step == self.crash_after:
            raise RuntimeError(f"crash after step {self.crash_after}")


def train_from_last_report(trainer) -> None:
    """``trainer.train()``, resumed from the last reported checkpoint when there is one."""
    from trainkit.huggingface.transformers import RayTrainReportCallback

    checkpoint = trainkit.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.train(resume_from_checkpoint=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        trainer.train()
