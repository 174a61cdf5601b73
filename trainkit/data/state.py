"""Shard states beside a checkpoint: one JSON file per rank and dataset. Runs in the workers."""

from __future__ import annotations

import json
import os
from typing import Optional


def state_file_name(dataset_name: str, world_rank: int) -> str:
    return f"dataset_state-{dataset_name}-rank{world_rank}.json"


def save_shard_state(directory: str, state: dict) -> str:
    """Write one rank's shard state into a checkpoint folder it is about to report.

    Every rank reports its own folder; trainkit merges them, so the committed checkpoint
    holds every rank's file. Returns the file's path.

    >>> save_shard_state(tmpdir, shard.state_dict())  # doctest: +SKIP
    """
    path = os.path.join(directory, state_file_name(state.get("dataset") or "data", int(state["world_rank"])))
    with open(path, "w") as f:
        json.dump(state, f)
    return path


def load_shard_states(directory: str, dataset_name: str) -> Optional[list[dict]]:
    """Every rank's saved state of ``dataset_name`` in a checkpoint folder (None if there is none).

    >>> with ckpt.as_directory() as d:  # doctest: +SKIP
    ...     shard = trainkit.get_dataset_shard("train", state_dict=load_shard_states(d, "train"))
    """
    prefix = f"dataset_state-{dataset_name}-rank"
    found = sorted(f for f in os.listdir(directory) if f.startswith(prefix) and f.endswith(".json"))
    if not found:
        return None
    states = []
    for f in found:
        with open(os.path.join(directory, f)) as fh:
            states.append(json.load(fh))
    return states
