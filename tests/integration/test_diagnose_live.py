"""``trainkit diagnose --live`` on a real running Ray run: every rank claims its process, so both
ranks are dumped, and the stuck one is named in its frame."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import pytest

import trainkit
from trainkit import RunConfig, ScalingConfig
from trainkit.cli import diagnose
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(180)]


def wait_for_first_report(run: str, timeout_s: float = 90) -> None:
    """Until the run folder's event stream has a committed report (the run is underway)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = os.path.join(run, "events.jsonl")
        if os.path.exists(events) and "report_committed" in open(events).read():
            return
        time.sleep(0.1)
    raise AssertionError(f"{run} never committed its first report within {timeout_s:.0f} s")


def _slow_rank_one(config):
    trainkit.report({"step": 1})
    if trainkit.get_context().get_world_rank() == 1:
        deadline = time.monotonic() + config["hold_s"]
        while time.monotonic() < deadline and not os.path.exists(config["release"]):
            time.sleep(0.05)  # LIVE-STUCK
    trainkit.report({"step": 2})


def test_live_dumps_both_ranks_of_a_running_ray_run(storage_path, tmp_path, capsys):
    release = str(tmp_path / "release")
    box = {}

    def fit():
        try:
            box["result"] = TorchTrainer(_slow_rank_one, train_loop_config={"hold_s": 60, "release": release},
                                         scaling_config=ScalingConfig(num_workers=2),
                                         run_config=RunConfig(name="live", storage_path=storage_path)).fit()
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=fit)
    t.start()
    run = os.path.join(storage_path, "live")
    try:
        wait_for_first_report(run)
        capsys.readouterr()
        assert diagnose(argparse.Namespace(run=run, live=True, json="-")) == 0
        live = {r["world_rank"]: r for r in json.loads(capsys.readouterr().out)["live"]}
        assert set(live) == {0, 1}
        assert all("refused" not in r.get("error", "") for r in live.values()), live
        assert live[1]["classification"] == "user_code"
        assert live[1]["user_frame"].startswith("_slow_rank_one (test_diagnose_live.py:")
    finally:
        open(release, "w").close()
        t.join(60)
    assert "error" not in box, box.get("error")
    assert box["result"].metrics == {"step": 2}
