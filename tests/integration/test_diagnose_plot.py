"""``trainkit diagnose RUN --plot OUT.png`` for a run that failed once and recovered (local mode, a
real fit): a PNG whose timeline has both attempts and the downtime between them, and a text that
does not tell the user to raise max_failures; a bad output path is refused before anything runs."""

from __future__ import annotations

import os
import tempfile

import pytest

import trainkit
from trainkit import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from trainkit import events as ev
from trainkit.cli import main as cli_main
from trainkit.diagnostics.plot import timeline_spans
from trainkit.torch import TorchTrainer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _fails_once(config):
    ck = trainkit.get_checkpoint()
    start = int(open(os.path.join(ck.path, "step")).read()) if ck else 0
    for i in range(start, 5):
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "step"), "w") as f:
            f.write(str(i + 1))
        trainkit.report({"step": i + 1}, checkpoint=Checkpoint.from_directory(d))
        if i == 2 and ck is None:
            raise RuntimeError("boom once")


def test_plot_of_a_run_that_failed_once_and_recovered(storage_path, tmp_path, capsys):
    result = TorchTrainer(_fails_once, scaling_config=ScalingConfig(num_workers=0),
                          run_config=RunConfig(name="once", storage_path=storage_path,
                                               failure_config=FailureConfig(max_failures=1))).fit()
    assert result.metrics == {"step": 5}
    run = os.path.join(storage_path, "once")
    png = tmp_path / "once.png"
    capsys.readouterr()
    assert cli_main(["diagnose", run, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "max_failures" not in out
    spans, downtime, _ = timeline_spans(ev.read_run(run))
    assert [(s.attempt, s.outcome) for s in spans] == [(1, "restarted"), (2, "finished")]
    assert len(downtime) == 1 and downtime[0][0] <= downtime[0][1]


def test_an_unwritable_plot_path_is_refused_before_the_run_is_read(tmp_path, capsys):
    assert cli_main(["diagnose", str(tmp_path / "no_such_run"), "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --plot") and "does not exist" in err
