"""A real 2-worker run where rank 1 is 40x slower: the controller names rank 1, and only rank 1, as a
straggler (with a py-spy sample of where it spends its time), and ``trainkit diagnose`` shows it in
its text and its ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest

import trainkit
from trainkit import RunConfig, ScalingConfig
from trainkit.cli import diagnose
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(180)]


def _slow_step(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # STRAGGLER-WORK
        time.sleep(0.005)


def _train(config):
    rank = trainkit.get_context().get_world_rank()
    for i in range(config["reports"]):
        _slow_step(0.8 if rank == 1 else 0.02)
        trainkit.report({"step": i + 1})


def test_a_rank_40x_slower_is_named_a_straggler_and_only_it(storage_path, tmp_path, capsys):
    result = TorchTrainer(_train, train_loop_config={"reports": 8}, scaling_config=ScalingConfig(num_workers=2),
                          run_config=RunConfig(name="slow", storage_path=storage_path)).fit()
    assert result.metrics == {"step": 8}
    run = os.path.join(storage_path, "slow")
    out = str(tmp_path / "diag.json")
    capsys.readouterr()
    assert diagnose(argparse.Namespace(run=run, live=False, json=out)) == 0
    text = capsys.readouterr().out
    with open(out) as f:
        data = json.load(f)
    (s,) = data["stragglers"]
    assert s["world_rank"] == 1
    assert s["median_step_s"] > 0.5 and s["others_median_step_s"] < 0.2
    assert s["classification"] == "user_code", s
    assert s["user_frame"].startswith("_slow_step (test_stragglers.py:"), s
    steps = {r["world_rank"]: r for r in data["steps"]}
    # rank 0's step runs from the previous release to its arrival, so it carries the release's delivery
    # time too (0.08 s measured on a loaded 2-core CI box, for 0.02 s of work); a step measured
    # release to release would make both ranks ~0.8 s, which this still catches.
    assert steps[1]["median_step_s"] > 4 * steps[0]["median_step_s"]
    assert "<- straggler" in text and text.count("<- straggler") == 1
    assert "rank 1: median" in text.split("<- straggler")[0].splitlines()[-1]
    assert "stragglers:\n  rank 1 (node" in text
