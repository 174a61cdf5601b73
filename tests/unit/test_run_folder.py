"""A run folder belongs to its run: a foreign folder is refused untouched, clean-up removes only what
trainkit wrote, and the names trainkit uses in a run folder cannot be checkpoint folders."""

from __future__ import annotations

import json
import os

import pytest

import trainkit
from trainkit import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from trainkit.errors import ConfigError
from trainkit.ledger import RunLedger
from trainkit.storage import RunStore
from trainkit.trainer import DataParallelTrainer


def _fit(fn, storage, name, **run_config):
    return DataParallelTrainer(fn, scaling_config=ScalingConfig(num_workers=0),
                               run_config=RunConfig(name=name, storage_path=str(storage), **run_config)).fit()


def _tree(root) -> dict:
    """Every file under ``root`` (relative name -> bytes) and every folder (name + '/' -> None)."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), root)] = f.read()
    return out


def _write(path, data: str = "x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)


def _steps(n: int, **report_kw):
    def train_fn():
        for step in range(1, n + 1):
            d = os.path.join(trainkit.get_context().get_storage().storage_path, f"src-{step}")
            _write(os.path.join(d, "step.json"), json.dumps({"step": step}))
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(d), **report_kw)
    return train_fn


def test_fit_on_a_folder_that_is_not_a_trainkit_run_fails_naming_it_and_touches_nothing(tmp_path):
    victim = tmp_path / "victim"
    _write(str(victim / "important_data" / "weights.bin"), "precious")
    _write(str(victim / "src" / "main.py"), "print('hi')")
    before = _tree(victim)

    with pytest.raises(ConfigError) as info:
        _fit(_steps(1), tmp_path, "victim")

    message = str(info.value)
    assert "RunConfig.name" in message and str(victim) in message
    assert "important_data/" in message and "src/" in message and "run_state.json" in message
    assert _tree(victim) == before  # no marker, no manifest, nothing deleted


def test_an_empty_existing_folder_is_a_new_run(tmp_path):
    (tmp_path / "fresh").mkdir()
    assert _fit(_steps(1), tmp_path, "fresh").metrics == {"step": 1}


def test_clean_up_removes_only_what_trainkit_wrote(tmp_path):
    _fit(_steps(2), tmp_path, "run")
    run = tmp_path / "run"
    _write(str(run / "notes" / "readme.txt"), "mine")  # the user's
    _write(str(run / "my_checkpoint_copy" / "model.pt"))  # the user's
    _write(str(run / "checkpoint_3" / "step.json"))  # a report whose commit never happened
    _write(str(run / "run_state.json.tmp-0123abcd"), "{")  # an interrupted manifest write
    _write(str(run / "checkpoint_2" / ".step.json.123.456.part"))  # an interrupted copy
    _write(str(run / "checkpoint_2" / "user.part"), "a user's file that ends in .part")

    _fit(_steps(0), tmp_path, "run")

    left = _tree(run)
    assert left["notes/readme.txt"] == b"mine" and "my_checkpoint_copy/model.pt" in left
    assert "checkpoint_3/" not in left
    assert "run_state.json.tmp-0123abcd" not in left
    assert "checkpoint_2/.step.json.123.456.part" not in left
    assert "checkpoint_2/user.part" in left and "checkpoint_2/step.json" in left


def test_a_dropped_checkpoint_with_a_custom_name_is_removed_at_the_next_start(tmp_path):
    def train_fn():
        for step in (1, 2):
            d = str(tmp_path / f"src-{step}")
            _write(os.path.join(d, "w.bin"))
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(d),
                            checkpoint_dir_name=f"ckpt-{step}")

    _fit(train_fn, tmp_path, "run", checkpoint_config=CheckpointConfig(num_to_keep=1))
    run = tmp_path / "run"
    _write(str(run / "ckpt-1" / "w.bin"))  # as if retention's delete never happened
    _write(str(run / "ckpt-9" / "w.bin"))  # never named by the run: not known to be trainkit's
    RunLedger(RunStore(str(tmp_path), "run"), CheckpointConfig()).start_attempt(1)
    assert not (run / "ckpt-1").exists()
    assert (run / "ckpt-9" / "w.bin").exists() and (run / "ckpt-2" / "w.bin").exists()


def test_a_checkpoint_folder_like_name_in_a_run_without_attempts_is_kept(tmp_path):
    store = RunStore(str(tmp_path), "run")
    RunLedger(store, CheckpointConfig())  # the manifest exists, no attempt ever started
    _write(os.path.join(store.run_path, "checkpoint_1", "mine.txt"))
    RunLedger(store, CheckpointConfig()).start_attempt(1)
    assert os.path.exists(os.path.join(store.run_path, "checkpoint_1", "mine.txt"))


@pytest.mark.parametrize("name", ["logs", "diagnostics", "run_state.json", "events.jsonl",
                                  "run_state.json.tmp-0123abcd", ".x.1.2.part", ".exactly_once", "a/b", "..",
                                  "a\\b"])
def test_a_name_trainkit_uses_in_the_run_folder_is_refused_as_checkpoint_dir_name(tmp_path, name):
    seen = []

    def train_fn():
        d = str(tmp_path / "src")
        _write(os.path.join(d, "model.pt"))
        try:
            trainkit.report({"step": 1}, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
        except ConfigError as e:
            seen.append(e)

    result = _fit(train_fn, tmp_path, "run")
    assert len(seen) == 1 and "checkpoint_dir_name" in str(seen[0]) and repr(name) in str(seen[0])
    assert result.checkpoint is None and result.metrics is None
    run = tmp_path / "run"
    assert not (run / "logs").exists() and not (run / "diagnostics").exists()
    assert json.loads((run / "run_state.json").read_text())["checkpoints"] == []


def test_the_ledger_refuses_to_commit_into_a_reserved_folder(tmp_path):
    ledger = RunLedger(RunStore(str(tmp_path), "run"), CheckpointConfig())
    ledger.start_attempt(1)
    with pytest.raises(ConfigError, match="checkpoint_dir_name"):
        ledger.commit(1, 1, {"step": 1}, "logs", {0: []})
